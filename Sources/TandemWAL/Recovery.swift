import Foundation
import Glibc
import TandemModel

/// Opening a log: every segment is read and every batch checked (header CRC, chain to the
/// previous batch, body CRC, LSN continuity, terms that never go down).
///
/// Where a valid batch cannot be read, recovery tells a torn tail from corruption:
/// - batches are written one at a time, the next only after the previous one's fsync, so
///   a torn write can only be the last batch of the last segment, followed by nothing but
///   zeros (the preallocation) or the end of the file;
/// - so if a valid batch header can still be found after the damage, or the damage is in
///   an earlier segment, the damaged data had been reported durable: that is corruption,
///   reported with segment, offset and LSN, and nothing is changed on disk;
/// - otherwise the damaged bytes are a write that was never reported durable: they are
///   copied to `<segment>.broken` and cut off.
extension WriteAheadLog {
    static func recover(directory: String, clusterID: ClusterID, options: WALOptions,
                        report: inout RecoveryReport) throws -> ([Segment], [(lsn: LSN, term: Term)]) {
        let fm = FileManager.default
        guard fm.fileExists(atPath: directory) else { throw WALError.notFound(directory) }
        let all: [String]
        do { all = try fm.contentsOfDirectory(atPath: directory) } catch { throw WALError.io("listing \(directory): \(error)") }
        // Leftovers of interrupted segment creation or rewrite never held durable data.
        for name in all where name.hasSuffix(".wal.tmp") || name == spareName { try? Durable.unlink(directory + "/" + name) }

        var names = try segmentNames(in: directory)
        var headers: [(name: String, header: WALFormat.SegmentHeader, fd: FileDescriptor)] = []
        for name in names {
            let path = directory + "/" + name
            let fd: FileDescriptor
            do { fd = try FileDescriptor(path: path, flags: O_RDWR) } catch { throw WALError.io("\(error)") }
            let bytes: [UInt8]
            do { bytes = try fd.read(count: WALFormat.segmentHeaderSize, at: 0) } catch { throw WALError.io("\(error)") }
            let header: WALFormat.SegmentHeader
            do { header = try WALFormat.decodeSegmentHeader(bytes) } catch {
                guard case let .message(why) = error else { throw WALError.io("\(error)") }
                throw WALError.corruption(segment: name, offset: 0, lsn: WALFormat.parseSegmentFileName(name) ?? .zero, reason: why)
            }
            guard header.clusterID == clusterID else {
                throw WALError.clusterMismatch(segment: name, expected: clusterID, found: header.clusterID)
            }
            guard header.firstLSN == WALFormat.parseSegmentFileName(name) else {
                throw WALError.corruption(segment: name, offset: 32, lsn: header.firstLSN, reason: "first LSN does not match the file name")
            }
            headers.append((name, header, fd))
        }
        // An interrupted reset may have moved a segment aside: without the reset segment it
        // replaced, put it back; with it, it is obsolete.
        let hasReset = headers.contains { $0.header.isReset }
        for name in all where name.hasSuffix(".wal.obsolete") {
            let path = directory + "/" + name
            if hasReset { try? Durable.unlink(path) } else {
                do { try Durable.rename(path, to: String(path.dropLast(".obsolete".count))) } catch { throw WALError.io("\(error)") }
                try? Durable.syncDirectory(directory)
                return try recover(directory: directory, clusterID: clusterID, options: options, report: &report)
            }
        }
        if let r = headers.lastIndex(where: { $0.header.isReset }), r > 0 {
            for h in headers[0..<r] { try? Durable.unlink(directory + "/" + h.name) }
            do { try Durable.syncDirectory(directory) } catch { throw WALError.io("\(error)") }
            report.obsoleteSegmentsRemoved = r
            headers.removeFirst(r)
            names.removeFirst(r)
        }
        guard !headers.isEmpty else { throw WALError.notFound(directory) }

        var segments: [Segment] = []
        var runs: [(lsn: LSN, term: Term)] = []
        var scratch = ScanBuffer()
        for (i, h) in headers.enumerated() {
            if let prev = segments.last {
                guard h.header.firstLSN == prev.lastLSN.next else {
                    throw WALError.corruption(segment: h.name, offset: 32, lsn: h.header.firstLSN,
                                              reason: "segment starts at LSN \(h.header.firstLSN) but the previous one ends at \(prev.lastLSN)")
                }
                guard h.header.previousTerm == prev.lastTerm else {
                    throw WALError.corruption(segment: h.name, offset: 40, lsn: h.header.firstLSN,
                                              reason: "previous term \(h.header.previousTerm) does not match the previous segment's last term \(prev.lastTerm)")
                }
            }
            let seg = try scanSegment(directory: directory, name: h.name, header: h.header, fd: h.fd,
                                      isLast: i == headers.count - 1, options: options,
                                      buffer: &scratch, runs: &runs, report: &report)
            segments.append(seg)
        }
        report.segments = segments.count
        return (segments, runs)
    }

    /// A reusable read buffer, so recovery does not allocate per segment.
    struct ScanBuffer: ~Copyable {
        var pointer: UnsafeMutableRawBufferPointer = .init(start: nil, count: 0)
        mutating func reserve(_ n: Int) -> UnsafeMutableRawBufferPointer {
            if pointer.count < n {
                pointer.deallocate()
                pointer = .allocate(byteCount: n, alignment: 64)
            }
            return UnsafeMutableRawBufferPointer(rebasing: pointer[0..<n])
        }
        deinit { pointer.deallocate() }
    }

    private static func scanSegment(directory: String, name: String, header: WALFormat.SegmentHeader, fd: FileDescriptor,
                                    isLast: Bool, options: WALOptions, buffer: inout ScanBuffer,
                                    runs: inout [(lsn: LSN, term: Term)], report: inout RecoveryReport) throws -> Segment {
        let path = directory + "/" + name
        let size: Int
        do { size = try fd.size() } catch { throw WALError.io("\(error)") }
        let buf = buffer.reserve(size)
        do {
            let n = try fd.read(into: buf, at: 0)
            guard n == size else { throw WALError.io("short read of \(path): \(n) of \(size) bytes") }
        } catch let e as WALError { throw e } catch { throw WALError.io("\(error)") }
        report.bytesScanned += size
        let view = UnsafeRawBufferPointer(buf)

        var seg = Segment(name: name, fd: fd, firstLSN: header.firstLSN, previousTerm: header.previousTerm,
                          headerCRC: header.crc, isReset: header.isReset, end: WALFormat.segmentHeaderSize,
                          chainCRC: header.crc, lastLSN: header.firstLSN.previous, lastTerm: header.previousTerm, path: path)
        var off = WALFormat.segmentHeaderSize
        var problem = ""
        while true {
            guard off + WALFormat.batchHeaderSize <= size else {
                problem = "batch header truncated"
                break
            }
            guard let h = WALFormat.decodeBatchHeader(view, at: off) else {
                problem = "no valid batch header"
                break
            }
            guard h.previousCRC == seg.chainCRC else { problem = "batch does not chain to the previous batch"; break }
            guard h.firstLSN == seg.lastLSN.next else { problem = "batch starts at LSN \(h.firstLSN), expected \(seg.lastLSN.next)"; break }
            let bodyStart = off + WALFormat.batchHeaderSize
            guard h.count > 0, h.bodyLength >= h.count * WALFormat.recordHeaderSize, bodyStart + h.bodyLength <= size else {
                problem = "batch length \(h.bodyLength) runs past the end of the file"
                break
            }
            let body = UnsafeRawBufferPointer(rebasing: view[bodyStart..<(bodyStart + h.bodyLength)])
            guard CRC32C.checksum(body) == h.bodyCRC else { problem = "batch body checksum mismatch"; break }
            // The body checksum covers every byte; here only the structure is checked.
            var r = bodyStart
            let end = bodyStart + h.bodyLength
            var lsn = seg.lastLSN
            var term = seg.lastTerm
            var batchRuns: [(lsn: LSN, term: Term)] = []
            var bad = ""
            for _ in 0..<h.count {
                guard r + WALFormat.recordHeaderSize <= end else { bad = "record header past the batch end"; break }
                let len = Int(UInt32(littleEndian: view.loadUnaligned(fromByteOffset: r, as: UInt32.self)))
                let rTerm = Term(UInt64(littleEndian: view.loadUnaligned(fromByteOffset: r + 8, as: UInt64.self)))
                let rLSN = LSN(UInt64(littleEndian: view.loadUnaligned(fromByteOffset: r + 16, as: UInt64.self)))
                guard rLSN == lsn.next else { bad = "record LSN \(rLSN) out of sequence (expected \(lsn.next))"; break }
                guard rTerm >= term else { bad = "record \(rLSN) term \(rTerm) below the previous \(term)"; break }
                guard RecordKind(rawValue: view[r + 24]) != nil else { bad = "record \(rLSN) has unknown kind \(view[r + 24])"; break }
                guard len <= options.maxRecordBytes, r + WALFormat.recordHeaderSize + len <= end else {
                    bad = "record \(rLSN) length \(len) runs past the batch"
                    break
                }
                if rTerm != term || (runs.isEmpty && batchRuns.isEmpty) { batchRuns.append((rLSN, rTerm)) }
                lsn = rLSN
                term = rTerm
                r += WALFormat.recordHeaderSize + len
            }
            if bad.isEmpty && r != end { bad = "records do not fill the batch" }
            guard bad.isEmpty else {
                // The checksum matched, so this was written this way: corruption by a bug,
                // never a torn write.
                throw WALError.corruption(segment: name, offset: off, lsn: seg.lastLSN.next, reason: bad)
            }
            for run in batchRuns where runs.last?.term != run.term { runs.append(run) }
            seg.add(WriteAheadLog.WrittenBatch(offset: off, byteCount: end - off, bodyCRC: h.bodyCRC,
                                               firstLSN: h.firstLSN, lastLSN: lsn, lastTerm: term))
            report.records += h.count
            off = end
        }
        seg.end = off

        if isAllZero(view, from: off) { return seg }
        // Damage: torn or corrupt?
        if let later = findLaterBatch(view, after: off, minimumLSN: seg.lastLSN.next) {
            throw WALError.corruption(segment: name, offset: off, lsn: seg.lastLSN.next,
                                      reason: "\(problem), yet a valid batch (LSN \(later)) follows: data reported durable is damaged")
        }
        guard isLast else {
            throw WALError.corruption(segment: name, offset: off, lsn: seg.lastLSN.next,
                                      reason: "\(problem) in a segment that is not the last")
        }
        // A torn final batch: keep the bytes for forensics, then cut them off.
        var lastNonZero = size - 1
        while lastNonZero > off && view[lastNonZero] == 0 { lastNonZero -= 1 }
        let torn = [UInt8](UnsafeRawBufferPointer(rebasing: view[off...lastNonZero]))
        do {
            let broken = try FileDescriptor(path: path + ".broken", flags: O_WRONLY | O_CREAT | O_TRUNC)
            try broken.write(torn, at: 0)
            try broken.sync()
            try fd.truncate(to: off)
            try fd.sync()
            if options.preallocate { try zeroFill(fd, from: off, to: options.segmentSize) }
            try fd.sync()
        } catch { throw WALError.io("cutting the torn tail of \(path): \(error)") }
        report.tornBytesRemoved += torn.count
        return seg
    }

    private static func isAllZero(_ view: UnsafeRawBufferPointer, from start: Int) -> Bool {
        var i = start
        let n = view.count
        // Word at a time once aligned.
        while i < n && i & 7 != 0 { if view[i] != 0 { return false }; i += 1 }
        while i + 8 <= n {
            if view.load(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < n { if view[i] != 0 { return false }; i += 1 }
        return true
    }

    /// The first LSN of a valid batch header found after `offset`, if any.
    private static func findLaterBatch(_ view: UnsafeRawBufferPointer, after offset: Int, minimumLSN: LSN) -> LSN? {
        guard let base = view.baseAddress else { return nil }
        let firstByte = Int32(WALFormat.batchMagic & 0xFF)
        var from = offset + 1
        while from + WALFormat.batchHeaderSize <= view.count {
            guard let hit = memchr(base + from, firstByte, view.count - from) else { return nil }
            let at = base.distance(to: UnsafeRawPointer(hit))
            if let h = WALFormat.decodeBatchHeader(view, at: at), h.firstLSN >= minimumLSN { return h.firstLSN }
            from = at + 1
        }
        return nil
    }
}
