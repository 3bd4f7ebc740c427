//! Giving freed heap memory back to the kernel.

/// Returns the allocator's free pages to the kernel (glibc's
/// `malloc_trim`; elsewhere nothing).
///
/// glibc gives back only the top of a heap by itself: pages freed in its
/// middle stay resident. Start-up leaves such holes. OpenSSL parses the
/// system's whole root store for every TLS client built, even for the tier
/// clients that then trust only the provider's CA: about 0.9 MB of an idle
/// proxy's 16 MB. The daemons call this once they are up and after each
/// heartbeat, so an idle one keeps only what it uses; a call walks the free
/// lists, well under a millisecond for an idle daemon's heap.
///
/// No maintained crate wraps this one libc call, hence one of the
/// workspace's two `unsafe` places (with `inherit::adopt`).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim takes no pointers and does nothing but return
    // free pages under the allocator's own locks; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}
