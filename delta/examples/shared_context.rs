//! How much a delta would gain from compression context shared across its
//! `BSDIFF` operations: decodes every operation's three streams, then
//! compresses them with xz -9 once per operation (as the format stores them:
//! each fetchable and verifiable alone) and once across all operations (a
//! 64 MiB dictionary: what one stream over the whole patch, HDiffPatch's
//! layout, can use). README, upgrade-large: "shared context 45 %".
//!
//! ```sh
//! cargo run --release -p ota-delta --example shared_context -- DIR   # DIR/{manifest.json,payload.bin}
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
    let dir = std::env::args()
        .nth(1)
        .expect("usage: shared_context DIR (holding manifest.json and payload.bin)");
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
        for i in 0..3 {
            all[i].extend_from_slice(&s[i]);
        }
        n += 1;
    }
    let raw: usize = all.iter().map(|v| v.len()).sum();
    let whole_each: usize = all.iter().map(|v| xz(v, 64 << 20)).sum();
    let whole_cat = xz(&all.concat(), 64 << 20);
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
}
