//! Payload codecs over real HTTP on 127.0.0.1: a delta whose bsdiff streams
//! use xz is offered only to agents that advertise xz in their check-in;
//! agents older than the codec (no `delta_codecs`) get the full image. With
//! the settings at `"auto"` (their default), a delta uses the codecs every
//! agent seen on its source version listed.

#[path = "common/mod.rs"]
mod common;

use common::*;
use ota_format::api::*;
use ota_format::manifest::Codecs;
use ota_format::{Envelope, Manifest};
use ota_server::releases::BuildStatus;

/// Two 256 KiB releases of machine code (this test binary's), the second
/// with 24 KiB of other code inserted in the middle: the delta is a bsdiff
/// patch whose extra stream is code, where xz beats zstd and bzip2.
fn code_images() -> (Vec<u8>, Vec<u8>) {
    const LEN: usize = 256 << 10;
    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let at = exe.len() / 4;
    let v1 = exe[at..at + LEN].to_vec();
    let mut v2 = v1[..LEN / 2].to_vec();
    v2.extend_from_slice(&exe[at + 2 * LEN..at + 2 * LEN + (24 << 10)]);
    v2.extend_from_slice(&v1[LEN / 2..]);
    v2.truncate(LEN);
    (v1, v2)
}

async fn manifest_of(ts: &TestServer, d: &Sim, o: &UpdateOffer) -> Manifest {
    let body = d
        .http
        .get(format!("{}{}", ts.base, o.manifest_url))
        .bearer_auth(&d.token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let json = Envelope::from_json(&body)
        .unwrap()
        .manifest_json_unverified()
        .unwrap();
    Manifest::from_json(&json).unwrap()
}

/// An idle check-in from version 1.0 listing `codecs`, as an agent of
/// that codec set's time sends it.
fn idle_checkin(codecs: Codecs) -> CheckinRequest {
    idle_request("1.0", codecs)
}

/// Releases `v1` then `v2` on a server with `config`, checks that the delta
/// needs `codec` (and the full image no codec), then that a current agent
/// is offered the delta and an agent sending `older` (its check-in
/// request) the full image. Returns the delta's manifest codecs.
async fn only_agents_with_the_codec_get_the_delta(
    config: &str,
    (v1, v2): (Vec<u8>, Vec<u8>),
    codec: &str,
    older: &CheckinRequest,
) -> Vec<String> {
    let ts = TestServer::start(&format!("{config}\n{}", fast_checkin(5000))).await;
    ts.release("t", "1.0", &v1).await;
    ts.release("t", "2.0", &v2).await;
    // The precondition: the delta needs the codec, the full image does not.
    let rel = ts.admin.releases().await.unwrap();
    let r = rel.iter().find(|r| r.version == "2.0").unwrap();
    for b in &r.builds {
        assert_eq!(b.status, BuildStatus::Ready);
        let codecs = &b.artifacts.as_ref().unwrap().codecs;
        match b.from_version {
            Some(_) => assert!(
                codecs.iter().any(|c| c == codec),
                "the delta should use {codec}: {codecs:?}"
            ),
            None => assert!(codecs.is_empty(), "the full image never needs {codec}"),
        }
    }

    let http = http();
    let new = Sim::enroll(&ts.base, "new-agent", "t", &http).await;
    let old = Sim::enroll(&ts.base, "older-agent", "t", &http).await;
    ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();

    let Action::Update(delta) = new.checkin("1.0", AgentState::Idle, None).await.action else {
        panic!("the current agent should be offered the update")
    };
    assert_eq!(delta.from_version.as_deref(), Some("1.0"));
    let codecs = manifest_of(&ts, &new, &delta).await.codecs;
    assert!(codecs.iter().any(|c| c == codec), "{codecs:?}");

    let resp: CheckinResponse = serde_json::from_slice(&old.checkin_raw(older).await).unwrap();
    let Action::Update(full) = resp.action else {
        panic!("the older agent should be offered the full image: {resp:?}")
    };
    assert_eq!(
        full.from_version, None,
        "no {codec} delta for an agent without {codec}"
    );
    assert!(manifest_of(&ts, &old, &full).await.codecs.is_empty());
    assert!(delta.payload_size < full.payload_size);
    codecs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_advertise_xz_gets_the_full_image_not_an_xz_delta() {
    // An agent from before `delta_codecs` sends exactly this JSON.
    let older = idle_checkin(Codecs::NONE);
    let body = serde_json::to_string(&older).unwrap();
    assert!(!body.contains("delta_codecs"), "{body}");
    let codecs =
        only_agents_with_the_codec_get_the_delta("delta_xz = true", code_images(), "xz", &older)
            .await;
    assert_eq!(codecs, ["xz"]);
}

/// Two 256 KiB releases of AArch64 code, the second with 24 KiB of new code
/// inserted in the middle: the delta's extra stream is new AArch64 code,
/// which the arm64 transform shrinks.
fn arm64_images() -> (Vec<u8>, Vec<u8>) {
    const LEN: usize = 256 << 10;
    let v1 = ota_delta::arm64::synthetic_code(LEN / 4, 0, 1);
    let mut v2 = v1[..LEN / 2].to_vec();
    v2.extend_from_slice(&ota_delta::arm64::synthetic_code(
        (24 << 10) / 4,
        LEN as u64 / 2,
        2,
    ));
    v2.extend_from_slice(&v1[LEN / 2..]);
    v2.truncate(LEN);
    (v1, v2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_advertise_arm64_gets_the_full_image_not_an_arm64_delta() {
    // An agent of the zero-runs codec's time lists xz and zero-runs only.
    let older = idle_checkin(serde_json::from_str(r#"["xz","zero-runs"]"#).unwrap());
    only_agents_with_the_codec_get_the_delta(
        "delta_xz = true\ndelta_zero_runs = true\ndelta_arm64 = true",
        arm64_images(),
        "arm64",
        &older,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_does_not_advertise_frames_gets_the_full_image_not_a_frames_delta() {
    // An agent of the arm64 codec's time lists xz, zero-runs and arm64.
    let older = idle_checkin(serde_json::from_str(r#"["xz","zero-runs","arm64"]"#).unwrap());
    only_agents_with_the_codec_get_the_delta(
        "delta_xz = true\ndelta_zero_runs = true\ndelta_arm64 = true\ndelta_frames = true",
        arm64_images(),
        "frames",
        &older,
    )
    .await;
}

/// The codecs of release 2.0's delta from 1.0 on a server started with the
/// default codec settings (`"auto"`), after `agents` (device id, the
/// codecs its check-ins list) checked in on 1.0; and each agent's offer
/// once a rollout runs (`true`: the delta).
async fn auto_delta_after(agents: &[(&str, Codecs)]) -> (Vec<String>, Vec<bool>) {
    let ts = TestServer::start(&fast_checkin(5000)).await;
    let (v1, v2) = arm64_images();
    ts.release("t", "1.0", &v1).await;
    let http = http();
    let mut sims = Vec::new();
    for (id, codecs) in agents {
        let d = Sim::enroll(&ts.base, id, "t", &http).await;
        let resp: CheckinResponse =
            serde_json::from_slice(&d.checkin_raw(&idle_checkin(*codecs)).await).unwrap();
        assert!(matches!(resp.action, Action::None), "{resp:?}");
        sims.push((d, *codecs));
    }
    ts.release("t", "2.0", &v2).await;
    let rel = ts.admin.releases().await.unwrap();
    let delta = rel
        .iter()
        .find(|r| r.version == "2.0")
        .unwrap()
        .builds
        .iter()
        .find(|b| b.from_version.is_some())
        .and_then(|b| b.artifacts.clone())
        .expect("the delta is built");
    ts.admin.rollout_create(&spec("2.0", "t")).await.unwrap();
    let mut offers = Vec::new();
    for (d, codecs) in &sims {
        let resp: CheckinResponse =
            serde_json::from_slice(&d.checkin_raw(&idle_checkin(*codecs)).await).unwrap();
        let Action::Update(o) = resp.action else {
            panic!("{} should be offered the update: {resp:?}", d.id)
        };
        let m = manifest_of(&ts, d, &o).await;
        assert!(m.codecs.iter().all(|c| codecs.contains(c)), "{m:?}");
        offers.push(o.from_version.is_some());
    }
    (delta.codecs, offers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_codecs_a_delta_uses_the_codecs_every_agent_on_its_source_version_lists() {
    let all = ota_format::manifest::codecs();
    let (codecs, offers) = auto_delta_after(&[("a", all), ("b", all)]).await;
    assert!(codecs.iter().any(|c| c == "arm64"), "{codecs:?}");
    // The delta's two changed chunks are one compression frame.
    assert!(codecs.iter().any(|c| c == "frames"), "{codecs:?}");
    assert_eq!(offers, [true, true]);
}

/// One agent of the arm64 codec's time (older than `frames`) among those on
/// the source version: the delta still uses arm64 but never frames, and
/// every device gets the delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_codecs_an_agent_older_than_frames_keeps_frames_out_of_the_delta() {
    let all = ota_format::manifest::codecs();
    let before_frames: Codecs = serde_json::from_str(r#"["xz","zero-runs","arm64"]"#).unwrap();
    let (codecs, offers) = auto_delta_after(&[("new", all), ("old", before_frames)]).await;
    assert!(codecs.iter().any(|c| c == "arm64"), "{codecs:?}");
    assert!(!codecs.iter().any(|c| c == "frames"), "{codecs:?}");
    assert_eq!(offers, [true, true]);
}

/// One agent older than the codecs among those on the source version: the
/// delta does without them, so every device gets a delta and none the full
/// image (with `delta_arm64 = true` the older one would get the full
/// image).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_codecs_one_older_agent_on_the_source_version_keeps_the_delta_codec_free() {
    let all = ota_format::manifest::codecs();
    let (codecs, offers) = auto_delta_after(&[("new", all), ("old", Codecs::NONE)]).await;
    assert!(codecs.is_empty(), "{codecs:?}");
    assert_eq!(offers, [true, true]);
}

/// No agent seen on the source version (say, a release added right after
/// a restart): a delta every agent decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_codecs_with_no_agent_seen_on_the_source_version_the_delta_is_codec_free() {
    let (codecs, offers) = auto_delta_after(&[]).await;
    assert!(codecs.is_empty(), "{codecs:?}");
    assert!(offers.is_empty());
}
