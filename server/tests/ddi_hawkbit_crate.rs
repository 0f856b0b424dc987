//! A second real DDI client nobody here wrote: the `hawkbit` crate (its
//! `ddi` module) polls our server, fetches the deployment, downloads the
//! bundle checking sha1, md5 and sha256 itself, and reports feedback that
//! commits the target in the rollout.

mod common;

use common::*;
use hawkbit::ddi::{Client, ClientAuthorization, Execution, Finished, Type};

#[tokio::test]
async fn hawkbit_crate_client_polls_downloads_with_hash_checks_and_commits() {
    let ts = TestServer::start(&fast_checkin(10_000)).await;
    let bundle = image(20, 7);
    bundle_release(&ts, "hbt", "3.1.0", "app-3.1.0.swu", &bundle).await;
    let t = Ddi::enroll(&ts.base, "hb-1", "hbt", &http()).await;
    let client = Client::new(
        &ts.base,
        "DEFAULT",
        "hb-1",
        ClientAuthorization::TargetToken(t.token.clone()),
        None,
        None,
        None,
    )
    .unwrap();

    let reply = client.poll().await.unwrap();
    assert!(reply.update().is_none(), "no rollout yet");
    assert!(reply.polling_sleep().unwrap().as_secs() >= 1);

    let st = ts
        .admin
        .rollout_create(&spec("3.1.0", "hbt"))
        .await
        .unwrap();
    let reply = client.poll().await.unwrap();
    assert!(reply.cancel_action().is_none());
    let update = reply
        .update()
        .expect("admitted: deploymentBase")
        .fetch()
        .await
        .unwrap();
    assert_eq!(update.download_type(), Type::Forced);
    assert_eq!(update.update_type(), Type::Forced);
    let chunk = update.chunks().next().expect("one chunk");
    assert_eq!((chunk.part(), chunk.version()), ("os", "3.1.0"));
    update
        .send_feedback(Execution::Download, Finished::None, vec!["downloading"])
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let files = update.download(dir.path()).await.unwrap();
    assert_eq!(files.len(), 1);
    let f = &files[0];
    f.check_sha1().await.unwrap();
    f.check_md5().await.unwrap();
    f.check_sha256().await.unwrap();
    assert_eq!(std::fs::read(f.file()).unwrap(), bundle);

    update
        .send_feedback(Execution::Downloaded, Finished::None, vec!["verified"])
        .await
        .unwrap();
    let s = ts.status(&st.id).await;
    assert_eq!(s.active_leases, 0, "downloaded releases the slot");
    update
        .send_feedback(Execution::Closed, Finished::Success, vec!["installed"])
        .await
        .unwrap();
    let s = ts.status(&st.id).await;
    assert_eq!(s.waves[0].committed, 1);
    assert!(client.poll().await.unwrap().update().is_none(), "done");
}
