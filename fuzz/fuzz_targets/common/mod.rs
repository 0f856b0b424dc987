//! Encoders the fuzz targets share to build valid streams around their
//! fuzzed parts (each target is its own binary; this module is compiled
//! into each, so not every target uses every function).
#![allow(dead_code)]

/// An xz stream (LZMA2 at `preset`, dictionary `dict` bytes, no integrity
/// check), as the generator writes them.
pub fn xz(data: &[u8], preset: u32, dict: usize) -> Vec<u8> {
    use std::io::Write;
    let mut opts = xz2::stream::LzmaOptions::new_preset(preset).expect("xz preset");
    opts.dict_size(dict as u32);
    let mut filters = xz2::stream::Filters::new();
    filters.lzma2(&opts);
    let stream = xz2::stream::Stream::new_stream_encoder(&filters, xz2::stream::Check::None)
        .expect("xz encoder");
    let mut enc = xz2::write::XzEncoder::new_stream(Vec::new(), stream);
    enc.write_all(data).expect("xz into a Vec");
    enc.finish().expect("xz into a Vec")
}

/// `v` as a LEB128 varint.
pub fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}
