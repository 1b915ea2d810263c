#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation

/// An error from a system call, naming the call, the path and errno's text.
public struct SystemError: Error, CustomStringConvertible, Sendable, Equatable {
    public let call: String
    public let path: String
    public let code: Int32

    public init(_ call: String, path: String, code: Int32 = errno) {
        self.call = call
        self.path = path
        self.code = code
    }

    public var description: String { "\(call)(\(path)): \(String(cString: strerror(code))) (errno \(code))" }
    /// ENOSPC or EDQUOT: the disk is full.
    public var isDiskFull: Bool { code == ENOSPC || code == EDQUOT }
}

/// A file descriptor owned by one object; closed when it goes away. Positional I/O only,
/// so several readers may share it.
public final class FileDescriptor: @unchecked Sendable {
    // Safe to share: pread and pwrite take explicit offsets and keep no cursor.
    public let fd: Int32
    public let path: String

    public init(path: String, flags: Int32, mode: mode_t = 0o644) throws {
        let fd = open(path, flags | O_CLOEXEC, mode)
        guard fd >= 0 else { throw SystemError("open", path: path) }
        self.fd = fd
        self.path = path
    }

    /// Takes ownership of a descriptor opened elsewhere (with flags `init(path:)` does not
    /// cover); it is closed when this object goes away.
    public init(adopting fd: Int32, path: String) {
        self.fd = fd
        self.path = path
    }

    deinit { close(fd) }

    public func size() throws -> Int {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError("fstat", path: path) }
        return Int(st.st_size)
    }

    /// Writes all of `bytes` at `offset`, retrying short writes and EINTR.
    public func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws {
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("pwrite", path: path)
            }
            done += n
        }
    }

    public func write(_ bytes: [UInt8], at offset: Int) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    /// Reads up to `count` bytes at `offset` into `buffer`; fewer only at end of file.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws -> Int {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("pread", path: path)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    public func read(count: Int, at offset: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        let n = try out.withUnsafeMutableBytes { try read(into: $0, at: offset) }
        if n < count { out.removeLast(count - n) }
        return out
    }

    /// fdatasync. An error here is final for the data written since the last success:
    /// callers must not retry it and report success (PostgreSQL's "fsyncgate").
    public func syncData() throws {
        while fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw SystemError("fdatasync", path: path)
        }
    }

    public func sync() throws {
        while fsync(fd) != 0 {
            if errno == EINTR { continue }
            throw SystemError("fsync", path: path)
        }
    }

    public func truncate(to size: Int) throws {
        guard ftruncate(fd, off_t(size)) == 0 else { throw SystemError("ftruncate", path: path) }
    }
}

/// Directory-level durability helpers: a rename or unlink is durable only once the
/// directory itself has been fsynced.
public enum Durable {
    public static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open", path: path) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw SystemError("fsync", path: path) }
    }

    public static func rename(_ from: String, to: String) throws {
        guard Glibc.rename(from, to) == 0 else { throw SystemError("rename", path: "\(from) -> \(to)") }
    }

    public static func unlink(_ path: String) throws {
        guard Glibc.unlink(path) == 0 || errno == ENOENT else { throw SystemError("unlink", path: path) }
    }

    /// Writes `bytes` to `path` crash-safely: a temporary file, fsync, rename, fsync of
    /// the directory. A reader sees the old content or the new, never a mix.
    public static func writeFile(_ bytes: [UInt8], to path: String) throws {
        let tmp = path + ".tmp"
        let fd = try FileDescriptor(path: tmp, flags: O_WRONLY | O_CREAT | O_TRUNC)
        try fd.write(bytes, at: 0)
        try fd.sync()
        try rename(tmp, to: path)
        try syncDirectory((path as NSString).deletingLastPathComponent)
    }

    public static func makeDirectory(_ path: String) throws {
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
}

/// Monotonic time in nanoseconds (CLOCK_MONOTONIC), for measurements; never wall-clock.
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
