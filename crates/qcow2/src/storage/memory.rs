//! Memory as storage, for tests.

use std::io;
use std::sync::{Mutex, PoisonError};

use super::Storage;

/// Bytes in memory.
#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: Mutex<Vec<u8>>,
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// Storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemStorage { bytes: Mutex::new(bytes) }
    }

    /// A copy of the current bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

fn range(offset: u64, len: usize) -> io::Result<(usize, usize)> {
    let start =
        usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let end = start.checked_add(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok((start, end))
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let (start, end) = range(offset, buf.len())?;
        let have = end.min(bytes.len()).saturating_sub(start);
        if have > 0 {
            buf[..have].copy_from_slice(&bytes[start..start + have]);
        }
        buf[have..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let (start, end) = range(offset, buf.len())?;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
        let end =
            usize::try_from(offset.saturating_add(len)).unwrap_or(usize::MAX).min(bytes.len());
        bytes[start..end].fill(0);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let (start, end) = range(
            offset,
            usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        )?;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].fill(0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.lock().unwrap_or_else(PoisonError::into_inner).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner).resize(len, 0);
        Ok(())
    }
}
