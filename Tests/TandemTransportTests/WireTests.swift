import Foundation
import Testing
import TandemCore
import TandemModel
@testable import TandemTransport
import TandemDrill

func sampleMessages() -> [Message] {
    let text = Array(String(repeating: "{\"practitioner\":\"RPPS-100\",\"mode\":\"video\",\"status\":\"booked\"}", count: 20).utf8)
    let records = (1...30).map { LogRecord(term: Term(3), lsn: LSN(UInt64(100 + $0)), kind: .changeset, payload: text) }
    let bodies: [Message.Body] = [
        .preVote(lastLSN: LSN(9), lastTerm: Term(2)),
        .preVoteResponse(granted: true, lastLSN: LSN(9), lastTerm: Term(2)),
        .vote(lastLSN: LSN(10), lastTerm: Term(3), transfer: true),
        .voteResponse(granted: false, lastLSN: LSN(11), lastTerm: Term(3)),
        .append(Append(prevLSN: LSN(100), prevTerm: Term(3), records: records, commitLSN: LSN(99), round: 17)),
        .append(Append(prevLSN: LSN(100), prevTerm: Term(3), records: [], commitLSN: LSN(99), round: 18)),
        .appendResponse(AppendResponse(success: true, matchLSN: LSN(130), lastLSN: LSN(130), round: 17)),
        .timeoutNow,
        .fetch(prevLSN: LSN(5), prevTerm: Term(1)),
        .fetchResponse(FetchResponse(success: true, prevLSN: LSN(100), prevTerm: Term(3), records: records, lastLSN: LSN(130))),
    ]
    return bodies.map { Message(from: "sbg", to: "gra", term: Term(3), body: $0) }
}

@Suite("Wire format")
struct WireTests {
    @Test("every message survives encoding and decoding, with and without LZ4", arguments: [true, false])
    func roundTrip(compress: Bool) throws {
        var encoder = WireEncoder(compress: compress)
        var decoder = FrameDecoder()
        let messages = sampleMessages()
        for m in messages { decoder.feed(encoder.message(m)) }
        for m in messages {
            let frame = try #require(try decoder.next())
            #expect(frame.type == .message)
            #expect(try decoder.message(frame.body) == m)
        }
        #expect(try decoder.next() == nil)
        if compress {
            #expect(encoder.statistics.compressionRatio > 5, "repetitive JSON-like records compress")
        } else {
            #expect(encoder.statistics.compressionRatio == 1)
        }
    }

    @Test("an incompressible record block goes plain; a compressed one whose stated size is wrong is refused")
    func incompressibleAndMisstated() throws {
        var rng = SeededRandom(seed: 7)
        let records = (1...8).map { i in
            LogRecord(term: Term(2), lsn: LSN(UInt64(40 + i)), kind: .changeset,
                      payload: (0..<4096).map { _ in UInt8(truncatingIfNeeded: rng.next()) })
        }
        let m = Message(from: "sbg", to: "gra", term: Term(2),
                        body: .append(Append(prevLSN: LSN(40), prevTerm: Term(2), records: records, commitLSN: LSN(40), round: 3)))
        var encoder = WireEncoder(compression: .lz4Block)
        var decoder = FrameDecoder()
        decoder.feed(encoder.message(m))
        let plain = try #require(try decoder.next())
        #expect(try decoder.message(plain.body) == m)
        #expect(encoder.statistics.compressionRatio == 1, "random bytes are sent as they are")

        // A compressed block: its raw length (body offset 56) one byte off either way.
        let frame = encoder.message(sampleMessages()[4])
        let body = Array(frame[5...])
        #expect(body[55] == 1, "the block is compressed")
        let stated = body.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 56, as: UInt32.self) }
        #expect(try decoder.message(body) == sampleMessages()[4])
        for wrong in [stated - 1, stated + 1] {
            let bad = Self.patched(body, at: 56, wrong)
            #expect { _ = try decoder.message(bad) } throws: { ($0 as? WireError)?.reason.contains("do not decompress") == true }
        }
    }

    /// An append of `count` records of `bytes` each: compressible text, and every third
    /// one random bytes (as scanned uploads are).
    static func mixedAppend(count: Int, bytes: Int, seed: UInt64) -> Message {
        var rng = SeededRandom(seed: seed)
        let text = Array(String(repeating: "{\"appointment\":\"video\",\"status\":\"booked\"} ", count: bytes / 40 + 1).utf8.prefix(bytes))
        let records = (0..<count).map { i in
            LogRecord(term: Term(5), lsn: LSN(UInt64(200 + i)), kind: .changeset,
                      payload: i % 3 == 2 ? (0..<bytes).map { _ in UInt8(truncatingIfNeeded: rng.next()) } : text)
        }
        return Message(from: "sbg", to: "gra", term: Term(5),
                       body: .append(Append(prevLSN: LSN(199), prevTerm: Term(5), records: records, commitLSN: LSN(199), round: 4)))
    }

    /// `body` with the little-endian u32 at `at` replaced by `v`.
    static func patched(_ body: [UInt8], at: Int, _ v: UInt32) -> [UInt8] {
        var b = body
        withUnsafeBytes(of: v.littleEndian) { for i in 0..<4 { b[at + i] = $0[i] } }
        return b
    }

    /// The chunks of an encoding-2 append body: (offset of the stored length, stored
    /// length), and the offset where the last one ends.
    static func chunks(of body: [UInt8]) -> (rawLength: Int, chunk: Int, list: [(at: Int, stored: Int)], end: Int) {
        func u32(_ o: Int) -> Int { Int(body.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: o, as: UInt32.self)) }) }
        let rawLength = u32(56), chunk = u32(60)
        var list: [(Int, Int)] = []
        var at = 64, left = rawLength
        while left > 0 {
            let stored = u32(at)
            list.append((at, stored))
            at += 4 + (stored == 0 ? min(chunk, left) : stored)
            left -= min(chunk, left)
        }
        return (rawLength, chunk, list, at)
    }

    /// A one-record append whose record block is `rawLength` bytes of text.
    static func textAppend(rawLength: Int) -> Message {
        let payload = Array(String(repeating: "teleconsultation video booked ", count: rawLength / 30 + 1).utf8.prefix(rawLength - 21))
        return Message(from: "sbg", to: "gra", term: Term(5), body: .append(Append(
            prevLSN: LSN(9), prevTerm: Term(5), records: [LogRecord(term: Term(5), lsn: LSN(10), kind: .changeset, payload: payload)],
            commitLSN: LSN(9), round: 1)))
    }

    @Test("a large record block travels in 64 KiB LZ4 chunks, the incompressible ones stored as they are")
    func lz4Chunks() throws {
        // 1.2 MB: 19 chunks, the last one partial; uploads of 64 KiB fill whole chunks.
        let m = Self.mixedAppend(count: 18, bytes: 65_536, seed: 21)
        var encoder = WireEncoder(compress: true)
        #expect(encoder.compression == .lz4Chunks)
        let body = Array(encoder.message(m)[5...])
        #expect(body[55] == 2, "encoding 2: LZ4 chunks")
        let layout = Self.chunks(of: body)
        #expect(layout.chunk == Wire.lz4ChunkBytes)
        #expect(layout.list.count == (layout.rawLength + layout.chunk - 1) / layout.chunk)
        #expect(layout.end == body.count, "the chunks fill the body")
        let stored = layout.list.filter { $0.stored == 0 }.count
        #expect(stored >= 5 && stored < layout.list.count, "the chunks of random bytes are stored, the others compressed (\(stored) of \(layout.list.count) stored)")
        let decoder = FrameDecoder()
        #expect(try decoder.message(body) == m)
        #expect(encoder.statistics.compressionRatio > 1.4 && encoder.statistics.compressionRatio < 3)
        #expect(encoder.statistics.recordBytesSent == body.count - 64, "the ratio counts every byte of the chunks, their lengths too")

        // A block smaller than one chunk, and one of exactly two chunks.
        for size in [700, 2 * Wire.lz4ChunkBytes - 21] {
            let small = Message(from: "sbg", to: "gra", term: Term(5), body: .append(Append(
                prevLSN: LSN(9), prevTerm: Term(5), records: [LogRecord(term: Term(5), lsn: LSN(10), kind: .changeset, payload: [UInt8](repeating: 65, count: size))],
                commitLSN: LSN(9), round: 1)))
            let b = Array(encoder.message(small)[5...])
            #expect(b[55] == 2)
            #expect(Self.chunks(of: b).list.count == (size + 21 + Wire.lz4ChunkBytes - 1) / Wire.lz4ChunkBytes)
            #expect(Self.chunks(of: b).end == b.count)
            #expect(try decoder.message(b) == small)
        }

        // A record header split between two chunks: the second record's header starts 10
        // bytes before the first chunk ends.
        let split = Message(from: "sbg", to: "gra", term: Term(5), body: .append(Append(
            prevLSN: LSN(9), prevTerm: Term(5), records: [
                LogRecord(term: Term(5), lsn: LSN(10), kind: .changeset, payload: [UInt8](repeating: 66, count: Wire.lz4ChunkBytes - 21 - 10)),
                LogRecord(term: Term(6), lsn: LSN(11), kind: .schema, payload: Array("CREATE TABLE t (id INTEGER PRIMARY KEY)".utf8)),
            ], commitLSN: LSN(9), round: 1)))
        let splitBody = Array(encoder.message(split)[5...])
        #expect(Self.chunks(of: splitBody).list.count == 2)
        #expect(try decoder.message(splitBody) == split)

        // The smallest and largest chunk sizes a decoder accepts.
        for size in [Wire.lz4ChunkBytesRange.lowerBound, Wire.lz4ChunkBytesRange.upperBound] {
            var e = WireEncoder(compress: true)
            e.lz4ChunkBytes = size
            let m = Self.textAppend(rawLength: 100_000)
            let b = Array(e.message(m)[5...])
            #expect(Self.chunks(of: b).chunk == size)
            #expect(try decoder.message(b) == m)
        }
    }

    @Test("a well-compressed frame holds memory in proportion to its size, not to its records' (send queues count its size)",
          arguments: [RecordCompression.lz4Chunks, .lz4Block])
    func compressedFrameMemory(compression: RecordCompression) throws {
        // 1 MiB of zeros compresses about 250 times.
        let m = Message(from: "sbg", to: "gra", term: Term(5), body: .append(Append(
            prevLSN: LSN(9), prevTerm: Term(5),
            records: (0..<16).map { LogRecord(term: Term(5), lsn: LSN(UInt64(10 + $0)), kind: .changeset, payload: [UInt8](repeating: 0, count: 65_536)) },
            commitLSN: LSN(9), round: 1)))
        var encoder = WireEncoder(compression: compression)
        let frame = encoder.message(m)
        #expect(frame.count < 20_000)
        #expect(frame.capacity <= 2 * frame.count + (64 << 10), "capacity \(frame.capacity) for \(frame.count) bytes")
        #expect(try FrameDecoder().message(Array(frame[5...])) == m)
    }

    @Test("a malformed chunked block is refused with a reason, never half-decoded")
    func malformedChunks() throws {
        let m = Self.mixedAppend(count: 9, bytes: 65_536, seed: 22)
        var encoder = WireEncoder(compress: true)
        let body = Array(encoder.message(m)[5...])
        let layout = Self.chunks(of: body)
        let compressed = try #require(layout.list.first { $0.stored > 0 })
        let storedRaw = try #require(layout.list.first { $0.stored == 0 })
        let decoder = FrameDecoder()
        func refused(_ bad: [UInt8], _ reason: String, sourceLocation: SourceLocation = #_sourceLocation) {
            #expect(throws: WireError.self, sourceLocation: sourceLocation) { _ = try decoder.message(bad) }
            do { _ = try decoder.message(bad) } catch {
                #expect(error.reason.contains(reason), "\(error.reason)", sourceLocation: sourceLocation)
            }
        }
        func patched(_ at: Int, _ v: UInt32) -> [UInt8] { Self.patched(body, at: at, v) }
        for size: UInt32 in [0, 512, 1023, (4 << 20) + 1, 8 << 20] { refused(patched(60, size), "chunk size \(size) is outside") }
        // A chunk size that differs from the sender's misreads the chunks.
        #expect(throws: WireError.self) { _ = try decoder.message(patched(60, 32 << 10)) }
        refused(patched(compressed.at, UInt32(Wire.lz4ChunkBytes)), "compressed bytes for")
        refused(patched(compressed.at, UInt32(compressed.stored - 1)), "does not decompress")
        // A stored chunk said to be compressed: random bytes are not an LZ4 block of that size.
        refused(patched(storedRaw.at, 1000), "does not decompress")
        refused(patched(56, UInt32(layout.rawLength + 1)), "truncated chunk")
        // Cut anywhere: refused, never a crash or a read past the end.
        for cut in stride(from: 56, to: body.count, by: 997) {
            #expect(throws: WireError.self) { _ = try decoder.message(Array(body[..<cut])) }
        }
        refused(body + [0], "trailing")
        // A stated size the bytes that follow cannot produce: refused before allocating it.
        refused(Array(patched(56, 64 << 20)[..<70]), "6 bytes cannot hold 1024 chunks")

        // A chunk that decompresses to fewer bytes than the chunk holds: the first of two
        // 1 KiB chunks carries a valid LZ4 block of 1,000 bytes, taken from an encoding-1
        // block of that size. No byte of the chunk may be left unwritten.
        var old = WireEncoder(compression: .lz4Block)
        let oneBlock = Array(old.message(Self.textAppend(rawLength: 1000))[5...])
        #expect(oneBlock[55] == 1)
        let block1000 = Array(oneBlock[64...])
        var small = WireEncoder(compress: true)
        small.lz4ChunkBytes = 1024
        let twoChunks = Array(small.message(Self.textAppend(rawLength: 2048))[5...])
        let parts = Self.chunks(of: twoChunks)
        #expect(parts.list.count == 2 && parts.list[0].stored > 0)
        var short = Array(twoChunks[..<64])
        withUnsafeBytes(of: UInt32(block1000.count).littleEndian) { short += $0 }
        short += block1000
        short += twoChunks[parts.list[1].at...]
        refused(short, "compressed chunk 0 does not decompress to 1024 bytes")
        // An encoding-1 block stated larger than LZ4 can expand what follows.
        refused(Self.patched(oneBlock, at: 56, UInt32(256 * block1000.count + 1)), "cannot decompress to")
        // Flipped bytes inside a compressed chunk: refused, or records that differ; LZ4's
        // safe decoder never writes outside the chunk.
        var rng = SeededRandom(seed: 5)
        for _ in 0..<200 {
            var b = body
            let at = compressed.at + 4 + Int(rng.next() % UInt64(compressed.stored))
            b[at] ^= UInt8(truncatingIfNeeded: rng.next() | 1)
            if let got = try? decoder.message(b) { #expect(got != m || b == body) }
        }
        // And anywhere in the block: the counts, lengths and chunk headers too.
        for _ in 0..<500 {
            var b = body
            for _ in 0..<(1 + rng.next() % 3) {
                let at = 51 + Int(rng.next() % UInt64(body.count - 51))
                b[at] ^= UInt8(truncatingIfNeeded: rng.next() | 1)
            }
            if let got = try? decoder.message(b) { #expect(got != m) }
        }
    }

    @Test("a sender without LZ4 chunks sends one LZ4 block, which a new receiver reads")
    func lz4BlockStillRead() throws {
        let m = Self.mixedAppend(count: 6, bytes: 30_000, seed: 23)
        var old = WireEncoder(compression: .lz4Block)
        let body = Array(old.message(m)[5...])
        #expect(body[55] == 1)
        let decoder = FrameDecoder()
        #expect(try decoder.message(body) == m)
        #expect(RecordCompression.negotiated(compress: true, chunks: true, peerFeatures: Wire.featureLZ4) == .lz4Block)
        #expect(RecordCompression.negotiated(compress: true, chunks: true, peerFeatures: Wire.featureLZ4 | Wire.featureLZ4Chunks) == .lz4Chunks)
        #expect(RecordCompression.negotiated(compress: true, chunks: false, peerFeatures: Wire.featureLZ4 | Wire.featureLZ4Chunks) == .lz4Block)
        #expect(RecordCompression.negotiated(compress: false, chunks: true, peerFeatures: Wire.featureLZ4 | Wire.featureLZ4Chunks) == .none)
        #expect(RecordCompression.negotiated(compress: true, chunks: true, peerFeatures: Wire.featureLZ4Chunks) == .none,
                "chunks alone, without LZ4, mean nothing")
    }

    @Test("frames large and small come out whole whatever the sizes of the reads", arguments: [11, 12, 13] as [UInt64])
    func readsOfAnySize(seed: UInt64) throws {
        var rng = SeededRandom(seed: seed)
        func records(_ count: Int, bytes: Int, from lsn: UInt64) -> [LogRecord] {
            (0..<count).map { i in
                LogRecord(term: Term(4), lsn: LSN(lsn + UInt64(i)), kind: .changeset,
                          payload: (0..<bytes).map { _ in UInt8(truncatingIfNeeded: rng.next() % 7) })
            }
        }
        // Small frames, frames just under and just over the direct-body bound, and large ones;
        // every other frame compressed.
        var messages = sampleMessages()
        for (count, bytes) in [(1, FrameDecoder.directBodyBytes - 120), (1, FrameDecoder.directBodyBytes), (40, 5000), (3, 100_000)] {
            messages.append(Message(from: "sbg", to: "gra", term: Term(4), body: .append(Append(
                prevLSN: LSN(9), prevTerm: Term(4), records: records(count, bytes: bytes, from: 10), commitLSN: LSN(9), round: 2))))
        }
        messages.shuffle(using: &rng)
        var stream: [UInt8] = []
        for (i, m) in messages.enumerated() {
            var encoder = WireEncoder(compress: i % 2 == 0)
            stream += encoder.message(m)
            if i % 3 == 0 { stream += WireEncoder.frame(.ping, []) }
        }
        var decoder = FrameDecoder()
        var got: [Message] = []
        var offset = 0
        var sawLargeMode = false
        while offset < stream.count {
            let want = Int(rng.next() % 3 == 0 ? 1 + rng.next() % 16 : 1 + rng.next() % 150_000)
            let n = decoder.receive(atMost: want) { room in
                let k = min(room.count, stream.count - offset)
                stream.withUnsafeBytes { room.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<(offset + k)])) }
                return k
            }
            #expect(n <= want)
            offset += n
            sawLargeMode = sawLargeMode || decoder.isReceivingLargeFrame
            while let f = try decoder.next() {
                if f.type == .message { got.append(try decoder.message(f.body)) }
            }
        }
        #expect(got == messages)
        #expect(decoder.buffered == 0)
        #expect(sawLargeMode, "large frames were received into their own arrays")
    }

    @Test("a large frame's header is judged before its body is gathered; a reader returning nothing, too little or too much changes nothing")
    func largeHeadersAndOddReaders() throws {
        // An unknown type or an oversized length in a large frame's header: refused with
        // its five bytes, before any body arrives.
        var limits = WireLimits()
        limits.maxFrameBytes = 1 << 20
        for (header, reason) in [([0, 0, 2, 0, 77] as [UInt8], "unknown frame type"), ([0, 0, 0x20, 0, 2], "exceeds the limit")] {
            var d = FrameDecoder(limits: limits)
            for b in header {
                d.receive(atMost: 1) { room in
                    room[0] = b
                    return 1
                }
            }
            #expect(!d.isReceivingLargeFrame)
            #expect { _ = try d.next() } throws: { ($0 as? WireError)?.reason.contains(reason) == true }
        }
        // Before the hellos, no frame larger than a hello is taken.
        var h = FrameDecoder(limits: WireLimits().forHandshake)
        h.feed([0, 0, 0, 1, 2])
        #expect(!h.isReceivingLargeFrame)
        #expect { _ = try h.next() } throws: { ($0 as? WireError)?.reason.contains("exceeds the limit") == true }

        // Readers that write nothing, claim a negative count, or claim more than the room.
        var encoder = WireEncoder(compress: false)
        let m = Message(from: "sbg", to: "gra", term: Term(1), body: .append(Append(
            prevLSN: .zero, prevTerm: .zero,
            records: [LogRecord(term: Term(1), lsn: LSN(1), kind: .changeset, payload: [UInt8](repeating: 9, count: 100_000))],
            commitLSN: .zero, round: 1)))
        let frame = encoder.message(m)
        var d = FrameDecoder()
        #expect(d.receive(atMost: 0) { _ in Issue.record("called for no room"); return 0 } == 0)
        var offset = 0, round = 0
        while offset < frame.count {
            round += 1
            let n = d.receive(atMost: 7_000) { room in
                switch round % 4 {
                case 0: return 0
                case 1: return -5
                default:
                    let k = min(room.count, frame.count - offset)
                    frame.withUnsafeBytes { room.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<(offset + k)])) }
                    // Claiming more than the room is taken as the room.
                    return round % 4 == 3 && k == room.count ? room.count + 1_000 : k
                }
            }
            #expect(n >= 0 && n <= 7_000)
            offset += n
        }
        let f = try #require(try d.next())
        #expect(try d.message(f.body) == m)
    }

    @Test("a frame cut at any byte waits for more and never yields garbage")
    func truncated() throws {
        var encoder = WireEncoder(compress: true)
        let frame = encoder.message(sampleMessages()[4])
        for cut in 0..<frame.count {
            var d = FrameDecoder()
            d.feed(Array(frame[0..<cut]))
            #expect(try d.next() == nil, "cut at \(cut)")
            d.feed(Array(frame[cut...]))
            let f = try #require(try d.next())
            #expect(try d.message(f.body) == sampleMessages()[4])
        }
    }

    @Test("an oversized, empty or unknown frame is refused with a reason before anything is allocated")
    func refusals() {
        var limits = WireLimits()
        limits.maxFrameBytes = 1024
        for (bytes, reason) in [([0xFF, 0xFF, 0xFF, 0x7F, 2], "exceeds the limit"), ([0, 0, 0, 0], "empty frame"), ([1, 0, 0, 0, 77], "unknown frame type")]
            as [([UInt8], String)] {
            var d = FrameDecoder(limits: limits)
            d.feed(bytes)
            #expect {
                _ = try d.next()
            } throws: { ($0 as? WireError)?.reason.contains(reason) == true }
        }
        // A record block claiming more than the limit.
        var w = ByteWriter()
        WireEncoder.shortString("a", &w); WireEncoder.shortString("b", &w)
        w.u64(1); w.u8(5); w.u64(0); w.u64(0); w.u64(0); w.u64(1)
        w.u32(2); w.u8(0); w.u32(UInt32.max)
        #expect { _ = try FrameDecoder().message(w.bytes) } throws: { ($0 as? WireError)?.reason.contains("record block") == true }
    }

    @Test("corrupted and random frames are refused or decoded, never crash", arguments: [1, 2, 3] as [UInt64])
    func corruptedAndRandom(seed: UInt64) {
        var rng = SeededRandom(seed: seed)
        var encoder = WireEncoder(compress: true)
        let frames = sampleMessages().map { encoder.message($0) }
        var refused = 0
        for i in 0..<3000 {
            var bytes: [UInt8]
            if i % 2 == 0 {
                bytes = frames[Int(rng.next() % UInt64(frames.count))]
                for _ in 0..<Int(1 + rng.next() % 4) { bytes[Int(rng.next() % UInt64(bytes.count))] ^= UInt8(1 + rng.next() % 255) }
            } else {
                bytes = (0..<Int(rng.next() % 300)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            }
            var d = FrameDecoder()
            d.feed(bytes)
            do {
                while let f = try d.next() {
                    if f.type == .message { _ = try d.message(f.body) }
                    if f.type == .hello { _ = try FrameDecoder.hello(f.body) }
                }
            } catch {
                refused += 1
            }
        }
        #expect(refused > 100)
    }

    @Test("the hello round-trips (with and without keepalive's peer timeout) and refuses a foreign magic or a peer timeout under 300 ms")
    func hello() throws {
        for h in [Hello(clusterID: ClusterID.random(), siteID: "witness", features: Wire.featureLZ4),
                  Hello(clusterID: ClusterID.random(), siteID: "sbg", features: Wire.featureLZ4 | Wire.featureKeepalive, peerTimeoutMilliseconds: 3000)] {
            var d = FrameDecoder()
            d.feed(WireEncoder.hello(h))
            let f = try #require(try d.next())
            #expect(try FrameDecoder.hello(f.body) == h)
            var bad = f.body
            bad[0] = UInt8(ascii: "X")
            #expect(throws: WireError.self) { _ = try FrameDecoder.hello(bad) }
        }
        var d = FrameDecoder()
        d.feed(WireEncoder.hello(Hello(clusterID: ClusterID.random(), siteID: "sbg", features: Wire.featureKeepalive, peerTimeoutMilliseconds: 20)))
        let f = try #require(try d.next())
        #expect(throws: WireError.self) { _ = try FrameDecoder.hello(f.body) }
    }
}

@Suite("Transport", .serialized)
struct TransportTests {
    @Test("three sites connect pairwise over mutual TLS and exchange the core's messages; a restarted site reconnects")
    func meshAndReconnect() async throws {
        final class Inbox: @unchecked Sendable {
            let lock = NSLock()
            var got: [SiteID: [Message]] = [:]
            func add(_ m: Message) { lock.withLock { got[m.to, default: []].append(m) } }
            func count(_ s: SiteID) -> Int { lock.withLock { got[s]?.count ?? 0 } }
        }
        let inbox = Inbox()
        let ids: [SiteID] = ["a", "b", "c"]
        // Ports picked by binding first.
        var ports: [SiteID: UInt16] = [:]
        for id in ids { ports[id] = try Transport.freeLoopbackPort() }
        func make(_ id: SiteID) throws -> Transport {
            var peers: [SiteID: PeerEndpoint] = [:]
            for p in ids where p != id { peers[p] = PeerEndpoint(host: "127.0.0.1", port: ports[p]!) }
            var settings = TransportSettings(site: id, clusterID: clusterA, listen: PeerEndpoint(host: "127.0.0.1", port: ports[id]!), peers: peers)
            settings.reconnectMinNanoseconds = 20_000_000
            settings.reconnectMaxNanoseconds = 200_000_000
            return Transport(settings: settings, context: try context(id.name)) { inbox.add($0) }
        }
        var transports = try ids.map(make)
        for t in transports { try t.start() }
        func waitConnected(_ ts: [Transport]) async throws {
            for _ in 0..<200 where !ts.allSatisfy({ $0.connectedPeers.count == 2 }) { try await Task.sleep(nanoseconds: 20_000_000) }
        }
        try await waitConnected(transports)
        #expect(transports.allSatisfy { $0.connectedPeers.count == 2 }, "\(transports.map(\.connectedPeers))")
        for m in sampleMessages() {
            transports[0].send(Message(from: "a", to: "b", term: m.term, body: m.body))
            transports[2].send(Message(from: "c", to: "a", term: m.term, body: m.body))
        }
        for _ in 0..<200 where inbox.count("b") < 10 || inbox.count("a") < 10 { try await Task.sleep(nanoseconds: 10_000_000) }
        #expect(inbox.count("b") == 10 && inbox.count("a") == 10)
        #expect(transports[0].metrics.compressionRatio > 2)
        // c restarts: the others reconnect to it.
        transports[2].stop()
        try await Task.sleep(nanoseconds: 100_000_000)
        transports[2] = try make("c")
        try transports[2].start()
        try await waitConnected(transports)
        #expect(transports[2].connectedPeers == ["a", "b"])
        // A peer that vanishes while a large stream is being written to it fails that
        // connection only (no SIGPIPE taking the whole process down).
        let big = sampleMessages()[4]
        for i in 0..<3000 {
            transports[0].send(Message(from: "a", to: "c", term: big.term, body: big.body))
            if i == 500 { transports[2].stop() }
        }
        for _ in 0..<200 where transports[0].connectedPeers.contains("c") { try await Task.sleep(nanoseconds: 10_000_000) }
        #expect(!transports[0].connectedPeers.contains("c"))
        for t in transports { t.stop() }
    }
}

/// (Async, sleeping with Task.sleep: a test that blocks a thread of the cooperative pool
/// would starve the in-process HTTP servers of the suites running beside it.)
@Suite("Connection set-up", .serialized)
struct ConnectionSetUpTests {
    /// Log lines of the transports a test made.
    final class Lines: @unchecked Sendable {
        private let lock = NSLock()
        private var lines: [(Date, String)] = []
        func add(_ s: String) { lock.withLock { lines.append((Date(), s)) } }
        func matching(_ needle: String) -> [String] { lock.withLock { lines.filter { $0.1.contains(needle) }.map(\.1) } }
        /// When the transports logged each line containing `needle` after `after`: taken
        /// on the transport's own threads, so a test whose sleeps resume late (other suites
        /// keeping the cooperative pool busy) still measures the transport, not itself.
        func times(_ needle: String, after: Date) -> [Date] {
            lock.withLock { lines.filter { $0.0 >= after && $0.1.contains(needle) }.map(\.0) }
        }
    }

    func pair(backoff: UInt64, logs: Lines = Lines()) throws -> (make: (SiteID) throws -> Transport, ports: [SiteID: UInt16]) {
        var ports: [SiteID: UInt16] = [:]
        for id: SiteID in ["a", "b"] { ports[id] = try Transport.freeLoopbackPort() }
        let fixed = ports
        return ({ id in
            let other: SiteID = id == "a" ? "b" : "a"
            var settings = TransportSettings(site: id, clusterID: clusterA, listen: PeerEndpoint(host: "127.0.0.1", port: fixed[id]!),
                                             peers: [other: PeerEndpoint(host: "127.0.0.1", port: fixed[other]!)])
            settings.reconnectMinNanoseconds = backoff
            settings.reconnectMaxNanoseconds = backoff
            settings.duplicateWindowNanoseconds = 300_000_000
            return Transport(settings: settings, context: try context(id.name), log: { logs.add("\(id): \($0)") }) { _ in }
        }, ports)
    }

    @Test("strangers holding every handshake slot open do not keep a site of the cluster out")
    func strangersCannotHoldTheSlots() async throws {
        let logs = Lines()
        // Back-off 3 s: a's own redial cannot be what connects them within the test's second.
        let (make, ports) = try pair(backoff: 3_000_000_000, logs: logs)
        let a = try make("a"), b = try make("b")
        try a.start()
        defer { a.stop(); b.stop() }
        // More idle TCP connections than a has handshake threads at all; each would hold
        // its thread for the handshake timeout (5 s) sending nothing.
        var strangers: [Int32] = []
        defer { for fd in strangers { Glibc.close(fd) } }
        for _ in 0..<(Transport.handshakeThreads + 8) {
            strangers.append(try Transport.connect(to: PeerEndpoint(host: "127.0.0.1", port: ports["a"]!), timeoutNanoseconds: 2_000_000_000))
        }
        try await Task.sleep(nanoseconds: 300_000_000)
        let start = Date()
        try b.start()
        for _ in 0..<300 where a.connectedPeers.isEmpty || b.connectedPeers.isEmpty { try await Task.sleep(nanoseconds: 10_000_000) }
        let connected = logs.times("b: event=peer_connected", after: start).min() ?? .distantFuture
        #expect(connected.timeIntervalSince(start) < 1, "b reached a only after \(connected.timeIntervalSince(start)) s")
        #expect(!logs.matching("event=handshake_cut").isEmpty, "no stranger's handshake was cut")
    }

    @Test("a restarted site reaches a peer at once, whichever id sorts first, although the peer's reconnection back-off is 3 s")
    func restartedSiteDialsAtOnce() async throws {
        let logs = Lines()
        let (make, _) = try pair(backoff: 3_000_000_000, logs: logs)
        for restarted: SiteID in ["b", "a"] {
            let survivor = try make(restarted == "a" ? "b" : "a")
            var again = try make(restarted)
            try survivor.start()
            try again.start()
            defer { survivor.stop(); again.stop() }
            for _ in 0..<300 where survivor.connectedPeers.isEmpty || again.connectedPeers.isEmpty { try await Task.sleep(nanoseconds: 10_000_000) }
            #expect(!survivor.connectedPeers.isEmpty)
            // The restarted site goes away; the survivor's next dial fails and it waits 1.5–3 s.
            again.stop()
            try await Task.sleep(nanoseconds: 300_000_000)
            again = try make(restarted)
            let start = Date()
            try again.start()
            for _ in 0..<800 where survivor.connectedPeers.isEmpty || again.connectedPeers.isEmpty { try await Task.sleep(nanoseconds: 5_000_000) }
            #expect(!survivor.connectedPeers.isEmpty && !again.connectedPeers.isEmpty)
            // When the restarted site logged the connection, on its own thread: a busy test
            // runner resuming this task late must not count. Had it waited for the
            // survivor's redial, that would be 1.5 s at the earliest.
            let connected = logs.times("\(restarted): event=peer_connected", after: start).min() ?? .distantFuture
            let took = connected.timeIntervalSince(start)
            #expect(took < 1.4, "the restarted site \(restarted) waited \(took) s for a connection to its peer")
        }
    }

    @Test("two sites dialing each other at once settle on one connection, the same on both sides, and keep it")
    func crossingDialsSettle() async throws {
        let logs = Lines()
        let (make, _) = try pair(backoff: 20_000_000, logs: logs)
        let a = try make("a"), b = try make("b")
        try a.start()
        try b.start()
        defer { a.stop(); b.stop() }
        // a may dial before b listens (connection refused, logged): only what the
        // crossings log counts.
        for _ in 0..<300 where a.dialedHere("b") == nil || b.dialedHere("a") == nil { try await Task.sleep(nanoseconds: 5_000_000) }
        let failedBefore = logs.matching("dial_failed").count
        for round in 0..<10 {
            for _ in 0..<300 where a.dialedHere("b") == nil || b.dialedHere("a") == nil { try await Task.sleep(nanoseconds: 5_000_000) }
            // Both sides lose the connection at once and both dial again at once: the
            // dials cross.
            let crossedBefore = a.crossedDialsClosed
            a.disconnect("b")
            b.disconnect("a")
            try await Task.sleep(nanoseconds: 100_000_000)
            // Past the window (300 ms here) in which crossing dials are settled.
            try await Task.sleep(nanoseconds: 400_000_000)
            let aDialed = a.dialedHere("b"), bDialed = b.dialedHere("a")
            if a.crossedDialsClosed > crossedBefore {
                #expect(aDialed == true, "round \(round): the dials crossed, and the one a (the lower id) dialed must be kept")
            }
            #expect(aDialed != nil && bDialed != nil && aDialed != bDialed,
                    "round \(round): each side must hold the one connection between them (a dialed: \(String(describing: aDialed)), b dialed: \(String(describing: bDialed)))")
            try await Task.sleep(nanoseconds: 200_000_000)
            #expect(a.dialedHere("b") == aDialed && b.dialedHere("a") == bDialed, "round \(round): the connection kept changing")
        }
        // The dials did cross (else this test proved nothing about settling them), and
        // only the lower id refuses.
        #expect(a.crossedDialsClosed > 0)
        #expect(b.crossedDialsClosed == 0)
        // A crossing is not a handshake failure on either side (the refused dialer got a
        // goodbye in place of the hello). (`closed` may appear: a dialer whose TCP connect
        // returns after it took the peer's dial drops that socket before TLS.)
        let failures = a.metrics.handshakeFailures.merging(b.metrics.handshakeFailures, uniquingKeysWith: +).filter { $0.key != .closed }
        #expect(failures.isEmpty, "\(failures)")
        let failedInRounds = logs.matching("dial_failed").dropFirst(failedBefore)
        #expect(failedInRounds.isEmpty, "a crossing was taken for a failed dial: \(failedInRounds.prefix(3))")
    }
}

/// (Async, sleeping with Task.sleep, as the suite above.)
@Suite("Keepalive", .serialized)
struct KeepaliveTests {
    /// Sites a and b, each reaching the other through a proxy that can hold every byte
    /// (a silent partition: no reset, no close), with a 1 s peer timeout.
    func pairThroughProxies(peerTimeout: UInt64, peerTimeoutOfB: UInt64? = nil,
                            logs: ConnectionSetUpTests.Lines) throws -> (a: Transport, b: Transport, proxies: [TCPProxy]) {
        var ports: [SiteID: UInt16] = [:], front: [SiteID: TCPProxy] = [:]
        for id: SiteID in ["a", "b"] {
            ports[id] = try Transport.freeLoopbackPort()
            front[id] = try TCPProxy(listenPort: try Transport.freeLoopbackPort(), targetPort: ports[id]!)
        }
        func make(_ id: SiteID) throws -> Transport {
            let other: SiteID = id == "a" ? "b" : "a"
            var settings = TransportSettings(site: id, clusterID: clusterA, listen: PeerEndpoint(host: "127.0.0.1", port: ports[id]!),
                                             peers: [other: PeerEndpoint(host: "127.0.0.1", port: front[other]!.listenPort)])
            settings.reconnectMinNanoseconds = 20_000_000
            settings.reconnectMaxNanoseconds = 200_000_000
            settings.handshakeTimeoutNanoseconds = 1_000_000_000
            settings.peerTimeoutNanoseconds = id == "b" ? peerTimeoutOfB ?? peerTimeout : peerTimeout
            return Transport(settings: settings, context: try context(id.name), log: { logs.add("\(id): \($0)") }) { _ in }
        }
        return (try make("a"), try make("b"), [front["a"]!, front["b"]!])
    }

    func connected(_ ts: [Transport]) -> Bool { ts.allSatisfy { !$0.connectedPeers.isEmpty } }

    /// An append from a to b of `records` records of `bytes` random bytes each, which LZ4
    /// cannot shrink.
    static func incompressibleAppend(records: Int, bytes: Int, seed: UInt64) -> Message {
        var rng = SeededRandom(seed: seed)
        let payload = (0..<bytes).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let log = (1...records).map { LogRecord(term: Term(3), lsn: LSN(UInt64(100 + $0)), kind: .changeset, payload: payload) }
        return Message(from: "a", to: "b", term: Term(3),
                       body: .append(Append(prevLSN: LSN(100), prevTerm: Term(3), records: log, commitLSN: LSN(99), round: 1)))
    }

    /// Starts both and waits (up to 2 s) until each counts the other as connected.
    func startConnected(_ a: Transport, _ b: Transport) async throws {
        try a.start()
        try b.start()
        for _ in 0..<400 where !connected([a, b]) { try await Task.sleep(nanoseconds: 5_000_000) }
        try #require(connected([a, b]))
    }

    @Test("a link slowed to a trickle keeps its connection while bytes still arrive, even with no whole TLS record within the peer timeout")
    func trickleIsHeard() async throws {
        let logs = ConnectionSetUpTests.Lines()
        let (a, b, proxies) = try pairThroughProxies(peerTimeout: 1_000_000_000, logs: logs)
        defer { a.stop(); b.stop(); for p in proxies { p.stop() } }
        try await startConnected(a, b)
        // 4 KB/s each way: a 16 KiB TLS record takes 4 s, four peer timeouts.
        for p in proxies { p.throttle(bytesPerSecond: 4_000) }
        a.send(Self.incompressibleAppend(records: 1, bytes: 64 << 10, seed: 9))
        try await Task.sleep(nanoseconds: 3_000_000_000)
        #expect(logs.matching("peer_disconnected").isEmpty,
                "a connection still carrying bytes was taken for silent: \(logs.matching("peer_disconnected").prefix(2))")
    }

    @Test("a frame the peer does not take leaves the I/O thread asleep, not waking every millisecond")
    func stalledWriteSleeps() async throws {
        let logs = ConnectionSetUpTests.Lines()
        // A long peer timeout (pings after 2 s): a busy test runner's late sleeps must not
        // reach it while the link is held.
        let (a, b, proxies) = try pairThroughProxies(peerTimeout: 12_000_000_000, logs: logs)
        defer { a.stop(); b.stop(); for p in proxies { p.stop() } }
        try await startConnected(a, b)
        // The link stops taking bytes (a paused peer, a full path), then a records'
        // worth that no buffer holds: random bytes, so LZ4 cannot shrink them.
        for p in proxies { p.hold() }
        let append = Self.incompressibleAppend(records: 8, bytes: 1 << 20, seed: 7)
        for _ in 0..<4 { a.send(append) }
        // Past the ping time (a sixth of the timeout, 2 s) with the frame half written.
        try await Task.sleep(nanoseconds: 2_500_000_000)
        let before = try #require(a.pollSleeps(to: "b"))
        try await Task.sleep(nanoseconds: 1_000_000_000)
        let after = try #require(a.pollSleeps(to: "b"), "the connection dropped before the peer timeout")
        // Asleep until the socket drains or the peer timeout: a few wake-ups a second;
        // a loop due "now" for a ping that cannot go out wakes a thousand times.
        #expect(after - before < 50, "the I/O thread woke \(after - before) times in 1 s with nothing it could do")
    }

    @Test("an idle connection is kept by pings; a peer cut off silently is dropped within the peer timeout and reached again soon after the network heals")
    func silentPartition() async throws {
        let logs = ConnectionSetUpTests.Lines()
        let (a, b, proxies) = try pairThroughProxies(peerTimeout: 1_000_000_000, logs: logs)
        defer { a.stop(); b.stop(); for p in proxies { p.stop() } }
        try await startConnected(a, b)
        // Idle for three peer timeouts: nothing but pings crosses, and the connection stays.
        let heardBefore = a.lastReceived(from: "b")
        try await Task.sleep(nanoseconds: 3_000_000_000)
        #expect(connected([a, b]) && logs.matching("peer_disconnected").isEmpty,
                "an idle connection was dropped: \(logs.matching("peer_disconnected").prefix(2))")
        // Pings keep the connection, but they are not the site speaking (what gates
        // forwarding a call to a primary).
        #expect(heardBefore != nil && a.lastReceived(from: "b") == heardBefore)
        // A silent partition: both sides notice within the timeout (1 s) plus a ping period.
        for p in proxies { p.hold() }
        let heldAt = Date()
        for _ in 0..<800 where connected([a, b]) || !a.connectedPeers.isEmpty || !b.connectedPeers.isEmpty {
            try await Task.sleep(nanoseconds: 5_000_000)
        }
        #expect(a.connectedPeers.isEmpty && b.connectedPeers.isEmpty, "a silently cut-off peer still counts as connected")
        let noticed = logs.times("nothing heard from", after: heldAt)
        #expect(!logs.matching("a: event=peer_disconnected peer=b reason=\"nothing heard").isEmpty
                && !logs.matching("b: event=peer_disconnected peer=a reason=\"nothing heard").isEmpty,
                "each side closes its end: \(logs.matching("peer_disconnected").prefix(2))")
        let noticedAfter = (noticed.max() ?? .distantFuture).timeIntervalSince(heldAt)
        // Counted for /metrics (tandem_peer_timeouts_total), once per side.
        #expect(a.metrics.peerTimeouts == ["b": 1] && b.metrics.peerTimeouts == ["a": 1])
        #expect(noticedAfter < 2.5, "took \(noticedAfter) s to notice a silent partition with a 1 s peer timeout")
        // Healed: connected again within the dial back-off and one handshake, not at TCP's
        // next retransmission.
        try await Task.sleep(nanoseconds: 500_000_000)
        for p in proxies { p.heal() }
        let healedAt = Date()
        for _ in 0..<1600 where !connected([a, b]) { try await Task.sleep(nanoseconds: 5_000_000) }
        #expect(connected([a, b]), "not reconnected after the network healed")
        let back = (logs.times("peer_connected", after: healedAt).min() ?? .distantFuture).timeIntervalSince(healedAt)
        #expect(back < 2.5, "took \(back) s to reconnect after the network healed")
        print("keepalive: silent partition noticed after \(noticedAfter) s (peer timeout 1 s), reconnected \(back) s after healing")
    }

    @Test("sites whose peer timeouts differ (300 ms and 2 s), or where one has none, keep an idle connection",
          arguments: [(UInt64(300_000_000), UInt64(2_000_000_000)), (UInt64(0), UInt64(1_000_000_000))])
    func differentTimeouts(a timeoutA: UInt64, b timeoutB: UInt64) async throws {
        let logs = ConnectionSetUpTests.Lines()
        let (a, b, proxies) = try pairThroughProxies(peerTimeout: timeoutA, peerTimeoutOfB: timeoutB, logs: logs)
        defer { a.stop(); b.stop(); for p in proxies { p.stop() } }
        try await startConnected(a, b)
        // Each side pinging at a sixth of its own timeout would have the 300 ms side drop
        // the connection over and over: pings come at a sixth of the shorter, the longer closes.
        try await Task.sleep(nanoseconds: 2_500_000_000)
        #expect(connected([a, b]) && logs.matching("peer_disconnected").isEmpty,
                "an idle connection was dropped: \(logs.matching("peer_disconnected").prefix(2))")
    }

    @Test("without keepalive (peer timeout 0) a silent partition goes unnoticed: the connection still counts as up")
    func withoutKeepalive() async throws {
        let logs = ConnectionSetUpTests.Lines()
        let (a, b, proxies) = try pairThroughProxies(peerTimeout: 0, logs: logs)
        defer { a.stop(); b.stop(); for p in proxies { p.stop() } }
        try await startConnected(a, b)
        for p in proxies { p.hold() }
        try await Task.sleep(nanoseconds: 2_500_000_000)
        // What the test above catches: without pings and a timeout nothing closes it.
        #expect(connected([a, b]))
        #expect(logs.matching("nothing heard from").isEmpty)
    }
}

@Suite("Certificate rotation", .serialized)
struct RotationTests {
    @Test("re-reading the TLS files keeps open connections and gives new ones the new certificate")
    func reload() async throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let dir = NSTemporaryDirectory() + "tandem-rotate-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func makeCerts(_ sites: [String]) throws {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/bin/bash")
            p.arguments = [root + "/Deploy/make-certs.sh", dir] + sites
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            p.waitUntilExit()
            #expect(p.terminationStatus == 0)
        }
        try makeCerts(["a", "b"])
        func ctx(_ s: String) throws -> TLSContext {
            try TLSContext(files: TLSFiles(certificate: "\(dir)/\(s).pem", privateKey: "\(dir)/\(s).key", certificateAuthority: "\(dir)/ca.pem"))
        }
        var ports: [String: UInt16] = [:]
        for s in ["a", "b"] { ports[s] = try Transport.freeLoopbackPort() }
        func settings(_ me: String, _ other: String) -> TransportSettings {
            var t = TransportSettings(site: SiteID(me), clusterID: clusterA, listen: PeerEndpoint(host: "127.0.0.1", port: ports[me]!),
                                      peers: [SiteID(other): PeerEndpoint(host: "127.0.0.1", port: ports[other]!)])
            t.reconnectMinNanoseconds = 20_000_000
            return t
        }
        let a = Transport(settings: settings("a", "b"), context: try ctx("a")) { _ in }
        let b = Transport(settings: settings("b", "a"), context: try ctx("b")) { _ in }
        try a.start()
        try b.start()
        defer {
            a.stop()
            b.stop()
        }
        for _ in 0..<200 where a.peerCertificates["b"] == nil { try await Task.sleep(nanoseconds: 10_000_000) }
        let before = try #require(a.peerCertificates["b"])
        try makeCerts(["b"])  // a new key and certificate for b, same CA
        try b.reloadTLS()
        try await Task.sleep(nanoseconds: 100_000_000)
        #expect(a.peerCertificates["b"] == before, "the open connection stays up with the old certificate")
        a.disconnect("b")
        for _ in 0..<300 where a.peerCertificates["b"] == nil || a.peerCertificates["b"] == before { try await Task.sleep(nanoseconds: 10_000_000) }
        let after = try #require(a.peerCertificates["b"])
        #expect(after != before, "the new connection uses the new certificate")
        #expect(after == (try ctx("b")).certificateFingerprint)

        // The watcher reloads by itself when the files change.
        let watcher = TLSFileWatcher(transport: b, files: TLSFiles(certificate: "\(dir)/b.pem", privateKey: "\(dir)/b.key",
                                                                   certificateAuthority: "\(dir)/ca.pem"),
                                     intervalNanoseconds: 50_000_000)
        defer { watcher.stop() }
        try await Task.sleep(nanoseconds: 120_000_000)
        try makeCerts(["b"])
        let third = try #require((try ctx("b")).certificateFingerprint)
        try await Task.sleep(nanoseconds: 300_000_000)
        a.disconnect("b")
        for _ in 0..<300 where a.peerCertificates["b"] != third { try await Task.sleep(nanoseconds: 10_000_000) }
        #expect(a.peerCertificates["b"] == third)
    }
}
