//! Settings for mimalloc, the allocator the server binary (and the forward-pass benches)
//! install: activations are fresh multi-MiB buffers on every layer of every batch, so how
//! the allocator hands freed memory back to the OS decides whether each forward pass pays
//! page faults.

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (libmimalloc-sys exports no
/// constant for it); `tests::purge_delay_is_the_option_at_this_index` guards the index.
const PURGE_DELAY: mi_option_t = 15;
/// The variable mimalloc reads the same option from; a value there wins over ours.
const PURGE_DELAY_ENV: &str = "MIMALLOC_PURGE_DELAY";

/// Keeps freed memory in the process for reuse instead of returning it to the OS after
/// mimalloc's default delay of one second. With the default, resnet50 at batch 8 on CPU
/// took ~9,500 page faults per 5 s (each zeroing fresh pages) and ran 5-15% slower
/// (BENCHMARKS.md). The cost: resident memory stays at its peak, which for a server with
/// fixed batch sizes is bounded by the largest batch's activations per worker. Setting
/// `MIMALLOC_PURGE_DELAY` (milliseconds; 0 = at once) restores purging.
pub fn keep_freed_memory() {
    if std::env::var_os(PURGE_DELAY_ENV).is_none() {
        // SAFETY: setting an option is thread-safe in mimalloc and takes plain integers.
        unsafe { mi_option_set(PURGE_DELAY, -1) };
    }
}

/// mimalloc's current purge delay in milliseconds (-1: never).
pub fn purge_delay_ms() -> std::ffi::c_long {
    // SAFETY: reading an option takes and returns plain integers.
    unsafe { mi_option_get(PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_delay_is_the_option_at_this_index() {
        if std::env::var_os(PURGE_DELAY_ENV).is_some() {
            return;
        }
        // v3's documented default for the purge delay; no other option defaults to it.
        assert_eq!(purge_delay_ms(), 1000);
        keep_freed_memory();
        assert_eq!(purge_delay_ms(), -1);
    }
}
