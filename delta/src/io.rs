//! Positional I/O: the only way the engine touches images.
//!
//! Operations are independent and may run concurrently on different threads,
//! so the engine never uses a shared file cursor: every read and write names
//! its offset (`pread`/`pwrite` on files).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Something the engine can read at an offset: a source slot or image.
pub trait ReadAt: Sync {
    /// Fills `buf` from `offset`, or fails (a short read is an error).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// Something the engine can write at an offset: the destination slot.
pub trait WriteAt: Sync {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl WriteAt for File {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

/// Streams `[offset, offset + len)` of `src` through `f` in pieces of at most
/// `buf.len()` bytes: reading large extents never needs more memory than the
/// caller's buffer.
pub fn for_each_piece<R: ReadAt + ?Sized>(
    src: &R,
    offset: u64,
    len: u64,
    buf: &mut [u8],
    mut f: impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    if buf.is_empty() && len > 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty streaming buffer",
        ));
    }
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], offset + done)?;
        f(&buf[..n], done)?;
        done += n as u64;
    }
    Ok(())
}
