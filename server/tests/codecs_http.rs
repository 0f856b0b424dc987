//! Payload codecs over real HTTP on 127.0.0.1: a delta whose bsdiff streams
//! use xz is offered only to agents that advertise xz in their check-in;
//! agents older than the codec (no `delta_codecs`) get the full image.

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
    CheckinRequest {
        install_gate: false,
        time_zone: None,
        current_version: "1.0".into(),
        booted_slot: Slot::A,
        state: AgentState::Idle,
        update: None,
        freshness_held: None,
        delta_codecs: codecs,
    }
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
