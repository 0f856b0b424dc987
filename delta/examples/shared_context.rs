//! How much a delta would gain from compression context shared across its
//! `BSDIFF` operations: decodes every operation's three streams, then
//! compresses them with xz -9 once per operation (as the format stores them:
//! each fetchable and verifiable alone) and once across all operations (a
//! 64 MiB dictionary: what one stream over the whole patch, HDiffPatch's
//! layout, can use). README, upgrade-large: "shared context 45 %".
//!
//! With `--frames K1,K2,…` it also compresses frames of K consecutive
//! operations' streams, coded as stored (control transposed, diff zero-run
//! coded), one xz -9 stream per kind and frame, its dictionary the frame
//! (K = 1 is that coding per operation): what compression frames spanning
//! several operations would save, and what they cost — a resumed or
//! retried operation refetches its frame.
//!
//! ```sh
//! cargo run --release -p ota-delta --example shared_context -- DIR   # DIR/{manifest.json,payload.bin}
//! cargo run --release -p ota-delta --example shared_context -- DIR --frames 2,4,8,16,64
//! ```
//!
//! The manifest's signature is not checked: this reads a delta one made.
use std::io::Write;
fn xz(data: &[u8], dict: u32) -> usize {
    let mut o = xz2::stream::LzmaOptions::new_preset(9).unwrap();
    o.dict_size(dict.max(4096));
    let mut f = xz2::stream::Filters::new();
    f.lzma2(&o);
    let s = xz2::stream::Stream::new_stream_encoder(&f, xz2::stream::Check::None).unwrap();
    let mut e = xz2::write::XzEncoder::new_stream(Vec::new(), s);
    e.write_all(data).unwrap();
    e.finish().unwrap().len()
}
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .expect(
            "usage: shared_context DIR [--frames K,…] (DIR holding manifest.json and payload.bin)",
        )
        .clone();
    let frames: Vec<usize> = match args.get(2).map(String::as_str) {
        Some("--frames") => args[3].split(',').map(|k| k.parse().unwrap()).collect(),
        _ => vec![],
    };
    let mut per_op: Vec<[Vec<u8>; 3]> = Vec::new();
    let env = std::fs::read(format!("{dir}/manifest.json")).unwrap();
    let payload = std::fs::read(format!("{dir}/payload.bin")).unwrap();
    let json = ota_format::Envelope::from_json(&env)
        .unwrap()
        .manifest_json_unverified()
        .unwrap();
    let m = ota_format::Manifest::from_json(&json).unwrap();
    let (mut per_op_stored, mut per_op_xz) = (0usize, 0usize);
    let mut all: [Vec<u8>; 3] = Default::default();
    let mut n = 0;
    for op in &m.operations {
        if op.kind != ota_format::manifest::OpKind::Bsdiff {
            continue;
        }
        let d = op.data.as_ref().unwrap();
        let data = &payload[d.offset as usize..(d.offset + d.length) as usize];
        let s = ota_delta::patch_streams::decompress(data, 1 << 30).unwrap();
        per_op_stored += data.len();
        let cat: Vec<u8> = s.concat();
        per_op_xz += xz(&cat, cat.len() as u32);
        if !frames.is_empty() {
            // As stored: control transposed into byte planes, diff
            // zero-run coded (unit 4), extra as is.
            let rows = s[0].len() / 24;
            let mut planes = vec![0u8; s[0].len()];
            for (r, e) in s[0].chunks_exact(24).enumerate() {
                for (k, b) in e.iter().enumerate() {
                    planes[k * rows + r] = *b;
                }
            }
            let diff = ota_delta::patch_streams::zero_runs_encode(&s[1], 4);
            per_op.push([planes, diff, s[2].clone()]);
        }
        for i in 0..3 {
            all[i].extend_from_slice(&s[i]);
        }
        n += 1;
    }
    let raw: usize = all.iter().map(|v| v.len()).sum();
    let (whole_each, whole_cat): (usize, usize) = if frames.is_empty() {
        (
            all.iter().map(|v| xz(v, 64 << 20)).sum(),
            xz(&all.concat(), 64 << 20),
        )
    } else {
        (0, 0) // not measured with --frames (minutes)
    };
    println!(
        "{n} BSDIFF ops; raw streams {raw} B (ctrl {}, diff {}, extra {})",
        all[0].len(),
        all[1].len(),
        all[2].len()
    );
    println!("as stored, per op:                 {per_op_stored}");
    println!("xz -9 per op (streams concatenated): {per_op_xz}");
    println!("xz -9 across all ops, per stream kind: {whole_each}");
    println!("xz -9 across all ops, one stream:      {whole_cat}");
    for k in frames {
        // One xz stream per frame of k operations, on every core.
        let groups: Vec<&[[Vec<u8>; 3]]> = per_op.chunks(k).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let total = std::sync::atomic::AtomicUsize::new(0);
        let largest = groups
            .iter()
            .map(|g| g.iter().flatten().map(Vec::len).sum::<usize>())
            .max()
            .unwrap_or(0);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(g) = groups.get(i) else { return };
                        let mut n = 0;
                        for kind in 0..3 {
                            let cat: Vec<u8> =
                                g.iter().flat_map(|o| o[kind].iter().copied()).collect();
                            if !cat.is_empty() {
                                n += xz(&cat, (cat.len() as u32).min(64 << 20));
                            }
                        }
                        total.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        let total = total.into_inner();
        println!(
            "coded as stored, xz -9 per kind and frame of {k:>3} ops: {total} ({} frames, largest {:.1} MiB decoded)",
            groups.len(),
            largest as f64 / 1048576.0
        );
    }
}
