import Foundation
import Glibc
import TandemCore
import TandemModel

/// Counters of the transport, by reason, for /metrics.
public final class TransportMetrics: @unchecked Sendable {
    // All fields guarded by `lock`.
    private let lock = NSLock()
    private var failures: [HandshakeFailure: Int] = [:]
    private var wire = WireStatistics()
    private var sentFrames = 0
    private var receivedFrames = 0
    private var dropped = 0
    private var silent: [SiteID: Int] = [:]

    public init() {}

    func handshakeFailed(_ reason: HandshakeFailure) { lock.withLock { failures[reason, default: 0] += 1 } }
    func sent(_ stats: WireStatistics) {
        lock.withLock {
            sentFrames += 1
            wire.recordBytesRaw += stats.recordBytesRaw
            wire.recordBytesSent += stats.recordBytesSent
        }
    }
    func received() { lock.withLock { receivedFrames += 1 } }
    func droppedMessage() { lock.withLock { dropped += 1 } }
    func peerTimedOut(_ peer: SiteID) { lock.withLock { silent[peer, default: 0] += 1 } }

    public var handshakeFailures: [HandshakeFailure: Int] { lock.withLock { failures } }
    public var compressionRatio: Double { lock.withLock { wire.compressionRatio } }
    /// Record bytes sent to peers, before and after compression.
    public var recordBytes: WireStatistics { lock.withLock { wire } }
    public var framesSent: Int { lock.withLock { sentFrames } }
    public var framesReceived: Int { lock.withLock { receivedFrames } }
    /// Messages dropped because a peer's queue was full or it was not connected (the
    /// protocol resends what matters).
    public var messagesDropped: Int { lock.withLock { dropped } }
    /// Connections closed because nothing arrived for the peer timeout, by peer (a link
    /// that drops packets, a paused or hung peer): keyed by configured peers only.
    public var peerTimeouts: [SiteID: Int] { lock.withLock { silent } }
}

/// What both sides check in the application handshake.
public struct HandshakeExpectations: Sendable {
    public var clusterID: ClusterID
    public var localSite: SiteID
    public var knownSites: Set<SiteID>
    public var compress: Bool
    /// Announce LZ4 chunks (`Wire.featureLZ4Chunks`) with LZ4 (tests turn it off to play
    /// a site that predates them).
    public var lz4Chunks = true
    public var timeoutNanoseconds: UInt64 = 5_000_000_000
    public var limits = WireLimits()
    /// The protocol version announced (tests announce others to check the refusal).
    public var protocolVersion = Wire.protocolVersion
    /// Nothing received from the peer for this long closes the connection (0: never; also
    /// never when the peer does not announce keepalive; at least 300 ms otherwise). Both
    /// sides announce theirs: a ping goes out after a sixth of the shorter without anything
    /// sent, and the longer closes, so a live peer is heard several times per period.
    public var peerTimeoutNanoseconds: UInt64 = 3_000_000_000

    public init(clusterID: ClusterID, localSite: SiteID, knownSites: Set<SiteID>, compress: Bool = true) {
        self.clusterID = clusterID
        self.localSite = localSite
        self.knownSites = knownSites
        self.compress = compress
    }

    /// The peer timeout this side announces, in milliseconds (0: no keepalive).
    var peerTimeoutMilliseconds: UInt32 {
        guard peerTimeoutNanoseconds > 0 else { return 0 }
        return UInt32(clamping: max(UInt64(Wire.minimumPeerTimeoutMilliseconds), peerTimeoutNanoseconds / 1_000_000))
    }

    var hello: Hello {
        Hello(version: protocolVersion, clusterID: clusterID, siteID: localSite,
              features: (compress ? Wire.featureLZ4 | (lz4Chunks ? Wire.featureLZ4Chunks : 0) : 0) | (peerTimeoutMilliseconds > 0 ? Wire.featureKeepalive : 0),
              peerTimeoutMilliseconds: peerTimeoutMilliseconds)
    }
}

/// An established, authenticated connection to one peer. One I/O thread reads frames
/// and writes the queued ones. A sender that finds nothing queued and the TLS stream free
/// writes its frame itself, on its own thread: on the commit path that saves a wake-up of
/// the I/O thread per message. Every OpenSSL call on the stream holds `sslLock` (an SSL
/// object must never be used from two threads at once).
public final class PeerConnection: @unchecked Sendable {
    public let peer: SiteID
    /// How record blocks are compressed on this connection (negotiated in the hellos).
    public let compression: RecordCompression
    public var compress: Bool { compression != .none }
    /// SHA-256 of the certificate the peer presented.
    public let peerCertificate: String?
    /// Whether this site dialed the connection (rather than accepted it).
    public let dialedHere: Bool
    /// When the handshake completed (monotonic nanoseconds).
    public let establishedAt: UInt64
    /// Silence from the peer after which the connection is closed (0: keepalive not
    /// negotiated, the connection lives until TCP or the peer ends it): the longer of the
    /// two sides' timeouts.
    public let peerTimeoutNanoseconds: UInt64
    /// Nothing written for this long sends a ping: a sixth of the shorter timeout.
    let pingAfterNanoseconds: UInt64
    let stream: TLSStream
    private let lock = NSLock()
    // Guarded by `lock`.
    private var queue: [[UInt8]] = []
    private var queuedBytes = 0
    private var isClosed = false
    private var lastReceived: UInt64 = 0
    /// When the last frame other than a ping arrived: what the site itself sent, not just
    /// its I/O thread (a primary whose loop is stuck still pings).
    private var lastFrame: UInt64 = 0
    /// Times the I/O thread went to sleep in poll(2): what shows a thread that wakes far
    /// more often than its traffic asks.
    private var sleeps = 0
    /// When bytes last went out (guarded by `sslLock`): a ping is due after a sixth of the
    /// peer timeout without any.
    private var lastSent: UInt64 = 0
    private let maxQueuedBytes: Int
    private let wakeRead: Int32
    private let wakeWrite: Int32
    private var decoder: FrameDecoder
    private let metrics: TransportMetrics
    /// Held around every use of `stream`'s SSL object; taken before `lock`, never after.
    private let sslLock = NSLock()
    // Guarded by `sslLock`: the frame being written (OpenSSL wants a retried write to
    // pass the same bytes, so it stays the same array until fully written) and its offset.
    private var current: [UInt8] = []
    private var offset = 0
    private var wantReadForWrite = false
    private var directFailure: String?

    /// Connects the TLS handshake and the application handshake, as the client (the site
    /// dialing) or the server. Throws with the reason on any refusal.
    /// `admit` (server side): asked, once the dialer's hello checked out and before this
    /// side answers with its own, whether to take the connection; false refuses it with
    /// `crossedDial`, so the dialer never counts it as up.
    public static func establish(fd: Int32, context: TLSContext, isServer: Bool, expectedPeer: SiteID?,
                          expect: HandshakeExpectations, metrics: TransportMetrics,
                          maxQueuedBytes: Int, admit: (SiteID) -> Bool = { _ in true }) throws(TransportError) -> PeerConnection {
        let deadline = monotonicNanoseconds() + expect.timeoutNanoseconds
        let stream = try TLSStream(context: context, fd: fd, isServer: isServer, expectedPeer: expectedPeer)
        do throws(TransportError) {
            try stream.handshake(deadline: deadline)
            // Until the hellos are exchanged no frame may be larger than a hello can be,
            // so a client that never says hello cannot make this side reserve a body of
            // maxFrameBytes.
            var decoder = FrameDecoder(limits: expect.limits.forHandshake)
            let remote: Hello
            if isServer {
                remote = try readHello(stream, &decoder, deadline: deadline)
                try check(remote, expect: expect, expectedPeer: nil)
                guard stream.peerCertificateNames(remote.siteID) else {
                    throw TransportError(.wrongSiteName, "the certificate presented does not name site \(remote.siteID)")
                }
                guard admit(remote.siteID) else {
                    // A goodbye instead of a hello: the dialer learns it was a crossing, not a failure.
                    try? stream.writeAll(WireEncoder.frame(.goodbye, []), deadline: min(deadline, monotonicNanoseconds() + 200_000_000))
                    throw TransportError(.crossedDial, "\(remote.siteID) dialed while this site was dialing it; the lower site id's connection is kept")
                }
                try stream.writeAll(WireEncoder.hello(expect.hello), deadline: deadline)
            } else {
                try stream.writeAll(WireEncoder.hello(expect.hello), deadline: deadline)
                remote = try readHello(stream, &decoder, deadline: deadline)
                try check(remote, expect: expect, expectedPeer: expectedPeer)
            }
            decoder.limits = expect.limits
            let compression = RecordCompression.negotiated(compress: expect.compress, chunks: expect.lz4Chunks,
                                                           peerFeatures: remote.features)
            let mine = UInt64(expect.peerTimeoutMilliseconds), theirs = UInt64(remote.peerTimeoutMilliseconds)
            let keepalive = mine > 0 && theirs > 0
            return try PeerConnection(peer: remote.siteID, stream: stream, decoder: decoder, compression: compression,
                                      peerTimeoutNanoseconds: keepalive ? max(mine, theirs) * 1_000_000 : 0,
                                      pingAfterNanoseconds: keepalive ? min(mine, theirs) * 1_000_000 / 6 : 0,
                                      dialedHere: !isServer, metrics: metrics, maxQueuedBytes: maxQueuedBytes)
        } catch {
            if error.reason != .crossedDial { metrics.handshakeFailed(error.reason) }
            stream.close()
            throw error
        }
    }

    private static func readHello(_ stream: TLSStream, _ decoder: inout FrameDecoder, deadline: UInt64) throws(TransportError) -> Hello {
        let frame = try stream.readFrame(&decoder, deadline: deadline)
        if frame.type == .goodbye {
            throw TransportError(.crossedDial, "the peer is dialing this site too; the connection the lower site id dials is kept")
        }
        guard frame.type == .hello else { throw TransportError(.other, "expected a hello frame, got \(frame.type)") }
        do { return try FrameDecoder.hello(frame.body) } catch {
            throw TransportError(error.reason.hasPrefix("not a Tandem") ? .other : .other, error.reason)
        }
    }

    private static func check(_ h: Hello, expect: HandshakeExpectations, expectedPeer: SiteID?) throws(TransportError) {
        guard h.version == Wire.protocolVersion else {
            throw TransportError(.unknownProtocolVersion, "peer speaks protocol version \(h.version), this site \(Wire.protocolVersion)")
        }
        guard h.clusterID == expect.clusterID else {
            throw TransportError(.wrongCluster, "peer belongs to cluster \(h.clusterID), not \(expect.clusterID)")
        }
        guard expect.knownSites.contains(h.siteID), h.siteID != expect.localSite else {
            throw TransportError(.unknownSite, "peer claims site \(h.siteID), which is not a configured peer")
        }
        if let expectedPeer, h.siteID != expectedPeer {
            throw TransportError(.wrongSiteName, "dialed \(expectedPeer) but the peer says it is \(h.siteID)")
        }
    }

    private init(peer: SiteID, stream: TLSStream, decoder: FrameDecoder, compression: RecordCompression, peerTimeoutNanoseconds: UInt64,
                 pingAfterNanoseconds: UInt64, dialedHere: Bool, metrics: TransportMetrics, maxQueuedBytes: Int) throws(TransportError) {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw TransportError(.other, "pipe: \(String(cString: strerror(errno)))") }
        for f in fds {
            _ = fcntl(f, F_SETFL, fcntl(f, F_GETFL) | O_NONBLOCK)
            _ = fcntl(f, F_SETFD, FD_CLOEXEC)
        }
        self.peer = peer
        self.stream = stream
        peerCertificate = stream.peerCertificateFingerprint()
        self.decoder = decoder
        self.compression = compression
        self.dialedHere = dialedHere
        self.peerTimeoutNanoseconds = peerTimeoutNanoseconds
        self.pingAfterNanoseconds = pingAfterNanoseconds
        establishedAt = monotonicNanoseconds()
        // The peer's hello just arrived, and this side's went out.
        lastReceived = establishedAt
        lastFrame = establishedAt
        lastSent = establishedAt
        self.metrics = metrics
        self.maxQueuedBytes = maxQueuedBytes
        wakeRead = fds[0]
        wakeWrite = fds[1]
    }

    deinit {
        Glibc.close(wakeRead)
        Glibc.close(wakeWrite)
    }

    /// Starts the I/O thread. `onFrame` gets each frame received; `onClose` runs once.
    public func start(onFrame: @escaping @Sendable (Wire.FrameType, [UInt8]) -> Void, onClose: @escaping @Sendable (String) -> Void) {
        let thread = Thread { [self] in
            nameCurrentThread("peer-\(peer)")
            let reason = ioLoop(onFrame: onFrame)
            // A sender writing directly holds sslLock and checks isClosed before it writes.
            sslLock.withLock {
                lock.withLock { isClosed = true }
                stream.close()
            }
            onClose(reason)
        }
        thread.start()
    }

    /// Frames up to this size may be written on the caller's thread when the stream is
    /// idle (a commit's append or acknowledgement saves waking the I/O thread). Larger
    /// ones, catch-up batches and snapshot chunks, always go to the I/O thread: encrypting
    /// a megabyte would hold the caller (the site's loop) for a millisecond, and meanwhile
    /// the caller can encode and compress the next one.
    static let directWriteLimit = 64 << 10

    /// Frames the I/O thread starts writing before it reads again.
    static let framesPerWriteRound = 16

    /// Queues a frame. False when the peer's queue is full (back-pressure: the message is
    /// dropped, the protocol sends what matters again) or the connection is closed.
    @discardableResult
    public func send(_ frame: [UInt8]) -> Bool {
        if frame.count <= Self.directWriteLimit && sslLock.try() {
            defer { sslLock.unlock() }
            let idle = lock.withLock { !isClosed && queue.isEmpty } && offset >= current.count && !wantReadForWrite && directFailure == nil
            if idle {
                current = frame
                offset = 0
                let r = current.withUnsafeBytes { stream.write($0) }
                switch r {
                case let .done(n):
                    offset += n
                    lastSent = monotonicNanoseconds()
                    if offset >= current.count { return true }
                case let .wouldBlock(readable):
                    if readable { wantReadForWrite = true }
                case let .closed(why):
                    directFailure = why
                }
                // The I/O thread finishes the frame (waiting for the socket) or reports
                // the failure.
                var one: UInt8 = 1
                _ = Glibc.write(wakeWrite, &one, 1)
                return true
            }
        }
        let ok: Bool = lock.withLock {
            guard !isClosed, queuedBytes + frame.count <= maxQueuedBytes || queue.isEmpty else { return false }
            queue.append(frame)
            queuedBytes += frame.count
            return true
        }
        if ok {
            var one: UInt8 = 1
            _ = Glibc.write(wakeWrite, &one, 1)
        }
        return ok
    }

    public func close() {
        lock.withLock { isClosed = true }
        var one: UInt8 = 1
        _ = Glibc.write(wakeWrite, &one, 1)
    }

    public var isOpen: Bool { lock.withLock { !isClosed } }
    /// When bytes last arrived from the peer (monotonic nanoseconds; 0: never).
    public var lastReceivedAt: UInt64 { lock.withLock { lastReceived } }
    /// How many times the I/O thread has waited in poll(2).
    var pollSleeps: Int { lock.withLock { sleeps } }
    /// When the peer last sent a frame of its own (a message, snapshot or forwarded call;
    /// the hello at first), pings not counted: "the site was heard", not just its socket.
    public var lastFrameAt: UInt64 { lock.withLock { lastFrame } }
    /// Bytes waiting to be written to this peer.
    public var queued: Int { lock.withLock { queuedBytes } }

    /// Hands every complete frame to `onFrame`; the reason to close, if one is malformed
    /// or the peer said goodbye.
    private func deliverFrames(at now: UInt64, _ onFrame: @Sendable (Wire.FrameType, [UInt8]) -> Void) -> String? {
        do {
            while let frame = try decoder.next() {
                if frame.type == .goodbye { return "the peer said goodbye" }
                if frame.type == .ping {
                    // Its bytes already counted as hearing the peer's socket.
                    guard frame.body.isEmpty else { return "malformed frame from \(peer): a ping with a body" }
                    continue
                }
                // A connection closed here (replaced by a newer one, or its peer dropped)
                // hands over nothing more: its frames would arrive interleaved with the
                // newer connection's, out of the order the peer sent them in.
                let closed: Bool = lock.withLock {
                    if !isClosed { lastFrame = now }
                    return isClosed
                }
                if closed { return "closed locally" }
                metrics.received()
                onFrame(frame.type, frame.body)
            }
        } catch {
            return "malformed frame from \(peer): \(error)"
        }
        return nil
    }

    private func ioLoop(onFrame: @Sendable (Wire.FrameType, [UInt8]) -> Void) -> String {
        var wantWriteForRead = false
        // Frames that arrived with the peer's hello are not left waiting for more bytes.
        if let why = deliverFrames(at: monotonicNanoseconds(), onFrame) { return why }
        while true {
            if lock.withLock({ isClosed }) { return "closed locally" }
            if let why = sslLock.withLock({ directFailure }) { return why }
            if peerTimeoutNanoseconds > 0 {
                // Nothing going out for a while: a ping, so the peer hears this side.
                let now = monotonicNanoseconds()
                sslLock.withLock {
                    guard offset >= current.count, now - min(now, lastSent) >= pingAfterNanoseconds,
                          lock.withLock({ queue.isEmpty }) else { return }
                    current = WireEncoder.frame(.ping, [])
                    offset = 0
                }
            }
            // Write queued frames while the socket takes them, at most a few per round:
            // a long backlog (a snapshot, a catch-up) must not keep the peer's
            // acknowledgements unread while the receiver drains as fast as this side writes.
            var framesStarted = 0
            var writeCapped = false
            let writeFailure: String? = sslLock.withLock {
                while !wantReadForWrite {
                    if offset >= current.count {
                        if framesStarted >= Self.framesPerWriteRound {
                            writeCapped = lock.withLock { !queue.isEmpty }
                            return nil
                        }
                        framesStarted += 1
                        let next: [UInt8]? = lock.withLock {
                            guard !queue.isEmpty else { return nil }
                            let f = queue.removeFirst()
                            queuedBytes -= f.count
                            return f
                        }
                        guard let next else { return nil }
                        current = next
                        offset = 0
                    }
                    let r = current.withUnsafeBytes { stream.write(UnsafeRawBufferPointer(rebasing: $0[offset...])) }
                    switch r {
                    case let .done(n):
                        offset += n
                        lastSent = monotonicNanoseconds()
                    case let .wouldBlock(readable):
                        if readable { wantReadForWrite = true }
                        return nil
                    case let .closed(why): return why
                    }
                }
                return nil
            }
            if let writeFailure { return writeFailure }
            // Read what is there, a bounded number of times so a peer that never stops
            // sending cannot starve this side's writes (acknowledgements).
            var readProgress = true
            var reads = 0
            while readProgress && reads < 16 {
                reads += 1
                // Decrypted straight into the decoder's memory (a large frame's own body).
                var r = TLSStream.IOResult.done(0)
                decoder.receive(atMost: 64 << 10) { room in
                    r = sslLock.withLock { stream.read(into: room) }
                    if case let .done(n) = r { return n }
                    return 0
                }
                switch r {
                case .done:
                    // Something arrived: a write that waited for a read may go on.
                    sslLock.withLock { wantReadForWrite = false }
                    let now = monotonicNanoseconds()
                    lock.withLock { lastReceived = now }
                    if let why = deliverFrames(at: now, onFrame) { return why }
                case let .wouldBlock(readable):
                    wantWriteForRead = !readable
                    readProgress = false
                case let .closed(why):
                    return why
                }
            }
            // More to read, or frames left behind by the write cap: go round before sleeping.
            if readProgress || writeCapped { continue }
            // Checked after reading what was there: a process resumed after a pause must
            // not take its own silence for the peer's.
            var waitMilliseconds: Int32 = 1000
            if peerTimeoutNanoseconds > 0 {
                let now = monotonicNanoseconds()
                let heard = lock.withLock { lastReceived }
                if now - min(now, heard) >= peerTimeoutNanoseconds {
                    // One last look without waiting: this thread may itself have been
                    // paused between its read and now.
                    var probe = pollfd(fd: stream.fd, events: Int16(POLLIN), revents: 0)
                    if poll(&probe, 1, 0) > 0 { continue }
                    metrics.peerTimedOut(peer)
                    return "nothing heard from \(peer) for the peer timeout (\(peerTimeoutNanoseconds / 1_000_000) ms)"
                }
                // Sleep until the next ping or the timeout falls due, rounded up. No ping is
                // due while a frame is half written (none can go out then): the ping time,
                // long past behind a full socket, would make this a 1 ms loop.
                let (sent, halfWritten) = sslLock.withLock { (lastSent, offset < current.count) }
                let pingDue = halfWritten ? UInt64.max : sent + pingAfterNanoseconds
                let due = min(pingDue, heard + peerTimeoutNanoseconds)
                waitMilliseconds = Int32(clamping: min(1000, (due - min(due, now) + 999_999) / 1_000_000))
                waitMilliseconds = max(1, waitMilliseconds)
            }
            let (pendingWrite, waitsForRead) = sslLock.withLock { (offset < current.count, wantReadForWrite) }
            // POLLOUT only when a write can make progress (not while it waits for a read),
            // or a read waits for the socket to drain.
            let wantOut = (pendingWrite && !waitsForRead) || wantWriteForRead
            var fds = [pollfd(fd: stream.fd, events: Int16(POLLIN) | (wantOut ? Int16(POLLOUT) : 0), revents: 0),
                       pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
            lock.withLock { sleeps += 1 }
            _ = poll(&fds, 2, waitMilliseconds)
            if fds[1].revents != 0 {
                var sink = [UInt8](repeating: 0, count: 256)
                while Glibc.read(wakeRead, &sink, sink.count) > 0 {}
            }
            if fds[0].revents & Int16(POLLOUT) != 0 { wantWriteForRead = false }
            // Bytes arrived: the peer is heard, even if they end no TLS record yet (a
            // 16 KiB record over a link of a few KB/s takes longer than the peer timeout;
            // only whole records would reach the read above).
            if fds[0].revents & Int16(POLLIN) != 0 {
                let now = monotonicNanoseconds()
                lock.withLock { lastReceived = now }
            }
        }
    }
}
