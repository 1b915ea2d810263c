import Glibc

/// Names the calling thread for the operating system, so `top -H`, `perf` and `ps -L`
/// show what each of a site's threads does (Foundation's `Thread.name` does not reach the
/// kernel on Linux, and Glibc's `pthread_setname_np` is not visible to Swift without
/// _GNU_SOURCE). Linux keeps 15 bytes of a name; the rest is cut off. Best effort: a
/// thread that cannot be named keeps its old name.
public func nameCurrentThread(_ name: String) {
    let fd = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { return }
    defer { close(fd) }
    let bytes = Array(name.utf8.prefix(15))
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
}
