//! The download pool's memory bound, counted: a delta of many `BSDIFF`
//! operations fetched over real HTTP on 127.0.0.1 and applied by
//! `pool::run` holds at its peak no more than its `memory_budget` plus the
//! documented constants (one bzip2 decoder, the HTTP read buffers of
//! `parallel` connections) — the bound `ota-agent run` is sized by
//! (README, "Agent memory on a 2 GiB delta").
//!
//! This test binary has its own global allocator
//! (`ota_tests::counting_alloc`) and a single test. The test server runs on
//! its own runtime whose threads are not counted; the pool's runtime and the
//! blocking threads it applies on are.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ota_agent::pool::{self, PoolConfig, PoolStats};
use ota_delta::apply::{hash_range, op_memory};
use ota_delta::patch_streams::{BZIP2_DECODER_BYTES, BZIP2_DECODERS};
use ota_format::OpKind;
use ota_tests::counting_alloc::{self, Counting};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static A: Counting = Counting;

#[test]
fn pool_holds_at_most_its_budget_plus_the_documented_constants() {
    // 1 MiB chunks of a changed image: every chunk a BSDIFF against a
    // window of several MiB.
    let fx = Fixture::new(16 << 20, 1 << 20, false);
    let ops = &fx.manifest.operations;
    assert!(
        ops.iter().filter(|o| o.kind == OpKind::Bsdiff).count() >= 8,
        "the fixture must exercise BSDIFF"
    );
    // Frames too: their members are applied two at a time where the
    // reservation allows (`group_work_with`), inside the same budget.
    assert!(fx.frame_groups() > 0, "the fixture must exercise frames");
    let budget = ota_delta::apply::APPLY_MEMORY_BUDGET;
    let largest = ops.iter().map(op_memory).max().unwrap();
    assert!(largest <= budget, "{largest}");

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(counting_alloc::ignore_this_thread)
        .enable_all()
        .build()
        .unwrap();
    let server = server_rt.block_on(Server::start(&[&fx]));
    let Slots {
        dir: _dir,
        source,
        dest,
    } = fx.slots();
    let cfg = PoolConfig {
        parallel: 4,
        // Each operation's data (100-800 bytes of patch) about its own
        // unit, so that units run at once and the budget is what limits them.
        range_size: 128,
        memory_budget: budget,
        stall_timeout: Duration::from_secs(10),
        ..PoolConfig::default()
    };
    let agent_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = server.pool_client(cfg.stall_timeout);
    let offer = fx.offer("u");
    let manifest = Arc::new(fx.manifest.clone());
    let todo: Vec<usize> = (0..ops.len()).collect();

    let before = counting_alloc::start();
    let result = agent_rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel(256);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let r = pool::run(
            &client,
            &offer.payload_url,
            manifest,
            &todo,
            dest.clone(),
            Some(source),
            &cfg,
            &CancellationToken::new(),
            tx,
            Arc::new(PoolStats::default()),
        )
        .await;
        drain.await.unwrap();
        r
    });
    let held = counting_alloc::held_since(before);
    result.unwrap();
    assert_eq!(
        hash_range(&*dest, 0, fx.new.len() as u64).unwrap(),
        fx.manifest.to.sha256
    );
    // Besides the operations: one bzip2 decoder, each connection's read
    // buffer (hyper's at most ~400 KiB) and 1 MiB of runtime, client and
    // task bookkeeping.
    let bound = budget as usize
        + BZIP2_DECODERS * BZIP2_DECODER_BYTES as usize
        + cfg.parallel * (512 << 10)
        + (1 << 20);
    eprintln!("pool held {held} bytes at its peak (bound {bound}, largest operation {largest})");
    assert!(
        held <= bound,
        "the pool held {held} bytes at its peak, over its bound of {bound}"
    );
    drop(server);
    drop(server_rt);
}
