//! The whole `ddi_http` suite again on PostgreSQL + Redis: the DDI layer
//! uses only the state-backend trait, and this proves the PostgreSQL engine
//! decides DDI polls and feedback as the sled one does. Needs
//! `scripts/services.sh start`.

#[path = "ddi_http.rs"]
mod suite;
