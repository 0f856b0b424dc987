-- Groups: named, saved selectors a rollout can target (issue 15). The
-- record is crate::groups::Group as JSON; the name is its key.
CREATE TABLE groups (
    name   TEXT PRIMARY KEY,
    record JSONB NOT NULL
);
