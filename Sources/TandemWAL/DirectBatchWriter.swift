#if canImport(Glibc)
import Glibc
#endif
import CFileIO
import TandemModel

/// Writes the live segment's batches with O_DIRECT: the bytes go from this buffer to the
/// disk without the page cache, and the fdatasync after them only flushes the disk's
/// write cache. On this machine's virtio disk (a C program, 3,000 writes of each size
/// into a zero-filled file), write + fdatasync took, buffered against direct: 17.5 KiB
/// (a group of 64 records) 184–188 against 144–148 µs; 4 KiB 138–151 against 126–137 µs;
/// 512 B 152–158 against 131–140 µs.
///
/// Direct I/O moves whole aligned blocks, so each write starts at the block that holds
/// the segment's end. It rewrites the bytes already there (durable; kept here in `tail`)
/// with the same bytes, then the batch, then zeros up to the next block boundary, which
/// the zero-filled preallocation already holds. A torn write leaves each block old or
/// new, and the two agree on every durable byte: the same as the page cache, which
/// writes back whole 4 KiB pages. The on-disk format is unchanged.
final class DirectBatchWriter {
    /// Offsets, lengths and the buffer's address are multiples of this (a page: enough for
    /// 512-byte and 4 KiB sector disks alike).
    static let alignment = 4096

    let path: String
    /// The segment's ordinary descriptor: the writer serves only that file.
    let segment: FileDescriptor
    private let fd: FileDescriptor
    /// The file's size when opened: writes stay inside the preallocation.
    private let limit: Int
    /// The segment's end, and the bytes from its block's start up to it.
    private(set) var end: Int
    private var tail: [UInt8]
    private var buffer: UnsafeMutableRawPointer?
    private var capacity = 0
    private(set) var writes = 0

    /// Why a direct write was refused before it wrote anything.
    enum Refusal: Error {
        /// EINVAL on the first write: the device wants a larger alignment than 4 KiB.
        case alignment
    }

    /// Nil when the file system refuses O_DIRECT (some FUSE file systems, tmpfs before
    /// Linux 6.6): the caller then writes through the page cache.
    init?(segment: FileDescriptor, path: String, end: Int) throws {
        let raw = open(path, O_RDWR | O_CLOEXEC | tandem_o_direct())
        if raw < 0 {
            if errno == EINVAL { return nil }
            throw SystemError("open (O_DIRECT)", path: path)
        }
        // A descriptor object that closes `raw` however this initializer ends.
        let direct = FileDescriptor(adopting: raw, path: path)
        // The same file as the segment's descriptor, not another one put under its name
        // (a rewrite renamed over it whose directory fsync then failed): writing the
        // segment's tail into another file would overwrite durable bytes there.
        var a = stat(), b = stat()
        guard fstat(raw, &a) == 0, fstat(segment.fd, &b) == 0 else { throw SystemError("fstat", path: path) }
        guard a.st_dev == b.st_dev, a.st_ino == b.st_ino else {
            throw SystemError("open (O_DIRECT): another file under the segment's name", path: path, code: ESTALE)
        }
        self.fd = direct
        self.path = path
        self.segment = segment
        self.end = end
        self.limit = try segment.size()
        let blockStart = end / Self.alignment * Self.alignment
        let tail = try segment.read(count: end - blockStart, at: blockStart)
        guard tail.count == end - blockStart else {
            throw SystemError("pread", path: path, code: EIO)
        }
        self.tail = tail
    }

    deinit { free(buffer) }

    /// Whether the file system holding `directory` takes O_DIRECT (tests use it to know
    /// which path they exercise).
    static func isSupported(in directory: String) -> Bool {
        let path = directory + "/.direct-io-probe"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | tandem_o_direct(), 0o600)
        defer { unlink(path) }
        guard fd >= 0 else { return false }
        close(fd)
        return true
    }

    /// The file range a write of `count` bytes at the end covers: from the start of the
    /// block holding the end to the block boundary after the new end.
    func range(forAppending count: Int) -> Range<Int> {
        let start = end - tail.count
        return start..<(start + (tail.count + count + Self.alignment - 1) / Self.alignment * Self.alignment)
    }

    /// Writes `bytes` at the segment's end. False, with nothing written, when the aligned
    /// write would run past the preallocated file (the caller writes through the page
    /// cache instead and drops this writer, whose `tail` no longer matches the file).
    func write(_ bytes: [UInt8]) throws -> Bool {
        let range = range(forAppending: bytes.count)
        let start = range.lowerBound, length = range.count
        let total = tail.count + bytes.count
        guard range.upperBound <= limit else { return false }
        if capacity < length {
            free(buffer)
            buffer = nil
            capacity = 0
            var p: UnsafeMutableRawPointer?
            guard posix_memalign(&p, Self.alignment, length) == 0, let p else {
                throw SystemError("posix_memalign", path: path, code: ENOMEM)
            }
            buffer = p
            capacity = length
        }
        guard let buffer else { throw SystemError("posix_memalign", path: path, code: ENOMEM) }
        tail.withUnsafeBytes { if let b = $0.baseAddress { buffer.copyMemory(from: b, byteCount: tail.count) } }
        bytes.withUnsafeBytes { if let b = $0.baseAddress { (buffer + tail.count).copyMemory(from: b, byteCount: bytes.count) } }
        (buffer + total).initializeMemory(as: UInt8.self, repeating: 0, count: length - total)
        var done = 0
        while done < length {
            let n = pwrite(fd.fd, buffer + done, length - done, off_t(start + done))
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EINVAL && done == 0 && writes == 0 { throw Refusal.alignment }
                throw SystemError("pwrite (O_DIRECT)", path: path)
            }
            // A short direct write that is not whole blocks cannot be resumed aligned.
            guard n > 0, n % 512 == 0 else { throw SystemError("pwrite (O_DIRECT): short write", path: path, code: EIO) }
            done += n
        }
        let newEnd = end + bytes.count
        let newStart = newEnd / Self.alignment * Self.alignment
        tail = Array(UnsafeRawBufferPointer(start: buffer + (newStart - start), count: newEnd - newStart))
        end = newEnd
        writes += 1
        return true
    }
}
