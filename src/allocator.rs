//! The process allocator: mimalloc, asked the way a C program asks it.
//!
//! mimalloc keeps a heap per thread, so the request path never waits on an arena lock. The
//! `mimalloc` crate's `GlobalAlloc` passes every request to mimalloc's *aligned* entry points,
//! even for the alignment every block has anyway. In mimalloc 3 those take the aligned path's
//! checks first, and a request whose size class is not a power of two (a 24-, 48- or 96-byte
//! value, a 17 KB buffer) then falls through to the over-allocating fallback: a bigger block
//! and about 170 instructions where the plain path takes 20. On the gateway's full path that
//! was 27 of the 85 allocations of a request.
//!
//! So a request whose alignment mimalloc gives every block of its size goes to the plain
//! entry points, as the standard library's `System` allocator sends such a request to
//! `malloc`. On 64-bit targets mimalloc rounds small size classes to two words, so every block
//! of 16 bytes or more is 16-aligned and a smaller one is aligned to its 8-byte class
//! (`MI_MAX_ALIGN_SIZE`, the alignment of C's `max_align_t`). Anything else keeps the aligned
//! entry points. (A pull request to the `mimalloc` crate proposes the same dispatch,
//! purpleprotocol/mimalloc_rust#170; once the crate does it, its `MiMalloc` can replace this.)
//!
//! The only module with `unsafe` code (tests/tidy.rs keeps it so).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment mimalloc's plain entry points give any block at least this large.
const PLAIN_ALIGN: usize = 16;

/// Whether a plain allocation of `size` bytes is aligned enough for `align`.
#[inline(always)]
fn plain_fits(size: usize, align: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

/// mimalloc as the global allocator (see the module's documentation).
pub struct Mimalloc;

// SAFETY: every method hands the request to mimalloc, which returns null or a block of at
// least `size` bytes aligned to `align`: the plain entry points only when `plain_fits` holds,
// which mimalloc's size classes guarantee, and the aligned ones otherwise. `mi_free` and
// `mi_realloc*` accept a block from any of mimalloc's allocation functions.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if plain_fits(layout.size(), layout.align()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if plain_fits(layout.size(), layout.align()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe {
            if plain_fits(new_size, layout.align()) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aligned(p: *mut u8, align: usize) -> bool {
        !p.is_null() && (p as usize).is_multiple_of(align)
    }

    /// Every size up to a few pages with every alignment up to a page, many at once so blocks
    /// come from the middle of pages as well as their starts: each block is aligned as asked,
    /// whichever entry point served it, zeroed when asked, and keeps its bytes through a
    /// reallocation that grows or shrinks it across the plain/aligned line.
    #[test]
    fn every_block_is_aligned_as_its_layout_asks() {
        let a = Mimalloc;
        let sizes = (1..=260).chain([500, 1000, 1024, 1025, 4096, 17_000, 70_000, 300_000]);
        for size in sizes {
            for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
                let layout = Layout::from_size_align(size, align).unwrap();
                let blocks: Vec<*mut u8> = (0..8)
                    .map(|i| unsafe {
                        let p = if i % 2 == 0 {
                            a.alloc(layout)
                        } else {
                            a.alloc_zeroed(layout)
                        };
                        assert!(aligned(p, align), "size {size} align {align}: {p:?}");
                        if i % 2 == 1 {
                            let bytes = std::slice::from_raw_parts(p, size);
                            assert!(bytes.iter().all(|&b| b == 0), "zeroed {size}/{align}");
                        }
                        std::ptr::write_bytes(p, (i + 1) as u8, size);
                        p
                    })
                    .collect();
                for (i, p) in blocks.into_iter().enumerate() {
                    let fill = (i + 1) as u8;
                    let new_size = if i % 2 == 0 {
                        size * 3 + 5
                    } else {
                        size / 2 + 1
                    };
                    let q = unsafe { a.realloc(p, layout, new_size) };
                    assert!(
                        aligned(q, align),
                        "realloc {size}->{new_size} align {align}"
                    );
                    let kept = unsafe { std::slice::from_raw_parts(q, size.min(new_size)) };
                    assert!(kept.iter().all(|&b| b == fill), "kept {size}->{new_size}");
                    unsafe { a.dealloc(q, Layout::from_size_align(new_size, align).unwrap()) };
                }
            }
        }
    }

    #[test]
    fn plain_entry_points_only_where_mimalloc_guarantees_the_alignment() {
        assert!(plain_fits(24, 8));
        assert!(plain_fits(16, 16));
        assert!(plain_fits(1, 1));
        assert!(!plain_fits(8, 16), "an 8-byte class is only 8-aligned");
        assert!(!plain_fits(64, 32));
        assert!(!plain_fits(4096, 4096));
    }
}
