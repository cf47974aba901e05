//! Shared-memory surfaces from `Listener.Unix.Map.ScanoutMap`: the only unsafe code in the crate.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};

use memmap2::{Mmap, MmapOptions};

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("map of {len} bytes at offset {offset} overflows")]
    Overflow { offset: u64, len: u64 },
    #[error("fd holds {size} bytes, the surface needs {need}")]
    TooSmall { size: u64, need: u64 },
    #[error("cannot inspect or map the fd")]
    Io(#[from] std::io::Error),
}

/// A read-only mapping of `len` bytes at `offset` of a memfd QEMU keeps drawing into.
pub struct SharedSurface {
    map: Mmap,
    _fd: OwnedFd,
}

impl SharedSurface {
    /// Maps the surface after checking the fd is a regular file large enough for it: touching
    /// pages past the end of a file raises SIGBUS, so a short fd must be refused here.
    pub fn map(fd: OwnedFd, offset: u64, len: u64) -> Result<Self, MapError> {
        let end = offset
            .checked_add(len)
            .ok_or(MapError::Overflow { offset, len })?;
        let meta = std::fs::File::from(fd.as_fd().try_clone_to_owned()?).metadata()?;
        if !meta.is_file() || meta.len() < end {
            return Err(MapError::TooSmall {
                size: meta.len(),
                need: end,
            });
        }
        let len_usize = usize::try_from(len).map_err(|_| MapError::Overflow { offset, len })?;
        // SAFETY: the mapping is read-only and private to this struct, which keeps the fd open for
        // as long as the mapping lives. The file is at least `offset + len` bytes long (checked
        // above), so every mapped page is backed. QEMU may write into the memfd concurrently;
        // we only ever copy bytes out of it (tearing is acceptable, undefined values are not
        // possible for plain bytes). A peer that shrinks the memfd after this check could still
        // raise SIGBUS; QEMU never truncates display surfaces.
        let map = unsafe { MmapOptions::new().offset(offset).len(len_usize).map(&fd)? };
        Ok(Self { map, _fd: fd })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}
