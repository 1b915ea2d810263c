import Foundation
import Glibc
import TandemCore
import TandemModel

/// Where a peer listens.
public struct PeerEndpoint: Hashable, Sendable {
    public var host: String
    public var port: UInt16
    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }
}

/// Settings of a site's peer transport.
public struct TransportSettings: Sendable {
    public var site: SiteID
    public var clusterID: ClusterID
    public var listen: PeerEndpoint
    public var peers: [SiteID: PeerEndpoint]
    /// Negotiate LZ4 for record batches (on by default).
    public var compress = true
    /// With LZ4, announce independent 64 KiB chunks (`Wire.featureLZ4Chunks`); off only
    /// to measure or test the single-block encoding that older sites speak.
    public var lz4Chunks = true
    /// Frames queued for one peer beyond this are dropped (back-pressure).
    public var maxQueuedBytesPerPeer = 64 << 20
    public var handshakeTimeoutNanoseconds: UInt64 = 5_000_000_000
    /// Reconnection back-off: doubles from the minimum to the maximum, with jitter.
    public var reconnectMinNanoseconds: UInt64 = 50_000_000
    /// Capped at 2 s: a peer that comes back is dialed again within about that, and a
    /// failed dial costs a refused SYN (or one handshake) every 1–2 s.
    public var reconnectMaxNanoseconds: UInt64 = 2_000_000_000
    /// A dial from a peer with a higher id is refused while this site dials that peer or
    /// within this long after its own dial connected (both sides dialed at once: the
    /// lower id's connection is kept); later, a newer connection replaces an older one
    /// whoever dialed (the old one may be half-open: the peer restarted, and its dial is
    /// the proof). Also the age under which a connection that closed counts as dying young.
    public var duplicateWindowNanoseconds: UInt64 = 1_000_000_000
    /// A connection on which nothing arrived for this long is closed and dialed again
    /// (0: never). Both sides ping after a sixth of it with nothing else to send, so only
    /// a peer that is cut off silently (a partition that drops packets, a paused process)
    /// reaches it; TCP alone would hold such a connection for many minutes and the peer
    /// would rejoin only at TCP's next retransmission after the network healed.
    public var peerTimeoutNanoseconds: UInt64 = 3_000_000_000
    public var limits = WireLimits()

    public init(site: SiteID, clusterID: ClusterID, listen: PeerEndpoint, peers: [SiteID: PeerEndpoint]) {
        self.site = site
        self.clusterID = clusterID
        self.listen = listen
        self.peers = peers
    }

    var expectations: HandshakeExpectations {
        var e = HandshakeExpectations(clusterID: clusterID, localSite: site, knownSites: Set(peers.keys), compress: compress)
        e.lz4Chunks = lz4Chunks
        e.timeoutNanoseconds = handshakeTimeoutNanoseconds
        e.peerTimeoutNanoseconds = peerTimeoutNanoseconds
        e.limits = limits
        return e
    }
}

/// One long-lived, mutually authenticated TLS connection per pair of sites. Both sites
/// dial while they have no connection to the other (a restarted site reaches its peers at
/// once, instead of waiting out the survivor's reconnection back-off); when both dial at
/// once, the site with the lower id refuses the other's dial during the handshake
/// (`admit`), so both keep the one it dialed and nothing is sent on a connection that is
/// then dropped. Turns the core's messages into frames and frames back into messages; it
/// never interprets them.
///
/// Thread safety: state is guarded by `lock`; each connection has its own I/O thread.
public final class Transport: @unchecked Sendable {
    public let settings: TransportSettings
    public let metrics = TransportMetrics()
    private let lock = NSLock()
    /// Dialers wait on it while connected; a closing connection wakes them.
    private let dialWake = NSCondition()
    // Guarded by `lock`.
    private var context: TLSContext
    private var connections: [SiteID: PeerConnection] = [:]
    private var stopped = false
    private var listenFD: Int32 = -1
    private var handshakesInProgress = 0
    /// Accepted handshakes whose dialer has not yet proved to be a site of the cluster.
    private let unprovenHandshakes = HandshakeSlots(limit: Transport.handshakeSlots)
    private var crossedDials = 0
    /// Peers this site is dialing now, and peers whose dial to this site is being accepted
    /// (the settlement of crossing dials, see `admit`).
    private var dialing: Set<SiteID> = []
    private var accepting: [SiteID: Int] = [:]
    // Set before `start` (thread start orders these writes before any read).
    private var onMessage: @Sendable (Message) -> Void
    private var onSnapshotFrame: (@Sendable (SiteID, SnapshotFrame) -> Void)?
    private var onForwardFrame: (@Sendable (SiteID, ForwardFrame) -> Void)?
    private let log: @Sendable (String) -> Void

    /// `onMessage` runs on a connection's I/O thread for each message received.
    public init(settings: TransportSettings, context: TLSContext, log: @escaping @Sendable (String) -> Void = { _ in },
                onMessage: @escaping @Sendable (Message) -> Void) {
        self.settings = settings
        self.context = context
        self.onMessage = onMessage
        self.log = log
    }

    /// Replaces the receivers of messages and snapshot frames. Call before `start`.
    public func setHandlers(onMessage: @escaping @Sendable (Message) -> Void,
                            onSnapshotFrame: @escaping @Sendable (SiteID, SnapshotFrame) -> Void,
                            onForwardFrame: (@Sendable (SiteID, ForwardFrame) -> Void)? = nil) {
        self.onMessage = onMessage
        self.onSnapshotFrame = onSnapshotFrame
        self.onForwardFrame = onForwardFrame
    }

    /// Binds the listener and starts dialing every peer (while not connected to it).
    public func start() throws(TransportError) {
        // OpenSSL writes with write(2): a peer that vanished would otherwise kill the
        // whole process with SIGPIPE instead of failing that one connection with EPIPE.
        signal(SIGPIPE, SIG_IGN)
        let fd = try Self.listen(on: settings.listen)
        lock.withLock { listenFD = fd }
        let acceptor = Thread { [self] in
            nameCurrentThread("peer-accept")
            acceptLoop(fd)
        }
        acceptor.start()
        for (peer, endpoint) in settings.peers {
            let dialer = Thread { [self] in
                nameCurrentThread("dial-\(peer)")
                dialLoop(peer, endpoint)
            }
            dialer.start()
        }
    }

    public func stop() {
        let conns: [PeerConnection] = lock.withLock {
            stopped = true
            // Shut down, not closed: the acceptor wakes (EINVAL) and closes it itself.
            // Closed here, its number could be reused (by another listener of this
            // process) before the acceptor's next accept(2), which would then take that
            // socket's clients. Under the lock: an acceptor that sees `stopped` and closes
            // the listener does so after this, never before.
            if listenFD >= 0 { shutdown(listenFD, Int32(SHUT_RDWR)) }
            listenFD = -1
            return Array(connections.values)
        }
        for c in conns { c.close() }
    }

    /// Uses new TLS files for connections made from now on (SIGHUP); open ones stay.
    public func reload(context: TLSContext) { lock.withLock { self.context = context } }

    /// Sends a core message. Dropped (and counted) if the peer is not connected or its
    /// queue is full: the protocol re-sends what matters.
    /// Returns whether the message was queued.
    @discardableResult
    public func send(_ m: Message) -> Bool {
        guard let c = openConnection(to: m.to) else {
            metrics.droppedMessage()
            return false
        }
        var encoder = WireEncoder(compression: c.compression)
        let frame = encoder.message(m)
        if c.send(frame) {
            metrics.sent(encoder.statistics)
            return true
        }
        metrics.droppedMessage()
        return false
    }

    /// Sends a snapshot-transfer frame; false if not connected or the queue is full.
    @discardableResult
    public func send(_ frame: SnapshotFrame, to peer: SiteID) -> Bool {
        guard let c = openConnection(to: peer) else { return false }
        return c.send(frame.encode())
    }

    /// Sends a forwarded API call or its answer; false if not connected or the queue is full.
    @discardableResult
    public func send(_ frame: ForwardFrame, to peer: SiteID) -> Bool {
        guard let c = openConnection(to: peer) else { return false }
        return c.send(frame.encode())
    }

    /// Re-reads the TLS files (SIGHUP): new connections use them; open ones stay up.
    public func reloadTLS() throws(TransportError) {
        let fresh = try lock.withLock { context }.reloaded()
        reload(context: fresh)
        log("event=tls_reloaded site=\(settings.site) certificate_sha256=\(fresh.certificateFingerprint ?? "?")")
    }

    /// Bytes waiting to be written to `peer` (0 when not connected).
    public func queuedBytes(to peer: SiteID) -> Int { lock.withLock { connections[peer] }?.queued ?? 0 }

    /// SHA-256 of the certificate each connected peer presented.
    public var peerCertificates: [SiteID: String] {
        lock.withLock { connections.compactMapValues { $0.isOpen ? $0.peerCertificate : nil } }
    }

    /// Closes the connection to `peer` (both sides then dial again).
    public func disconnect(_ peer: SiteID) { lock.withLock { connections[peer] }?.close() }

    /// Dials from a peer with a higher id refused because this site was dialing it too.
    public var crossedDialsClosed: Int { lock.withLock { crossedDials } }

    /// When `peer` last sent a frame of its own (not a keepalive ping) on an open
    /// connection (monotonic nanoseconds), measured on the connection's own thread: it
    /// does not depend on this site's loop, and a peer whose loop is stuck while its I/O
    /// threads still ping is not heard.
    public func lastReceived(from peer: SiteID) -> UInt64? {
        openConnection(to: peer)?.lastFrameAt
    }

    /// How many times the I/O thread of the open connection to `peer` has waited in poll(2).
    func pollSleeps(to peer: SiteID) -> Int? { openConnection(to: peer)?.pollSleeps }

    /// Whether this site dialed its open connection to `peer` (nil when not connected).
    public func dialedHere(_ peer: SiteID) -> Bool? {
        openConnection(to: peer)?.dialedHere
    }

    public var connectedPeers: [SiteID] { lock.withLock { connections.filter { $0.value.isOpen }.map(\.key).sorted() } }

    // MARK: Connections

    private func openConnection(to peer: SiteID) -> PeerConnection? { lock.withLock { openLocked(peer) } }

    /// The open connection to `peer`, if any. Caller holds `lock`.
    private func openLocked(_ peer: SiteID) -> PeerConnection? {
        connections[peer].flatMap { $0.isOpen ? $0 : nil }
    }

    /// Whether this site may dial `peer`: no open connection to it, and no dial from it
    /// being accepted. Caller holds `lock`.
    private func mayDialLocked(_ peer: SiteID) -> Bool {
        openLocked(peer) == nil && accepting[peer] == nil
    }

    /// Server side, once a dialer's hello checked out: whether to take its connection.
    /// Crossing dials are settled here, before either side counts the connection as up
    /// (so nothing is ever sent on a connection that is then dropped): a site refuses a
    /// peer with a higher id while it is dialing that peer itself, or has just connected
    /// to it (within `duplicateWindowNanoseconds`); the peer with the higher id accepts,
    /// and a site does not dial a peer whose dial it is accepting. Taken connections are
    /// counted in `accepting` until adopted or failed.
    private func admit(_ peer: SiteID) -> Bool {
        lock.withLock {
            if stopped { return false }
            if settings.site < peer {
                let justConnected = openLocked(peer).map {
                    $0.dialedHere && monotonicNanoseconds() < $0.establishedAt + settings.duplicateWindowNanoseconds
                } ?? false
                if dialing.contains(peer) || justConnected {
                    crossedDials += 1
                    return false
                }
            }
            accepting[peer, default: 0] += 1
            return true
        }
    }

    /// A newer connection replaces an older one (which may be half-open: its peer
    /// restarted, and the new dial proves it).
    private func adopt(_ c: PeerConnection) {
        let (old, refused): (PeerConnection?, Bool) = lock.withLock {
            if stopped { return (nil, true) }
            let o = connections[c.peer]
            connections[c.peer] = c
            return (o, false)
        }
        if refused {
            c.close()
            c.stream.close()
            return
        }
        old?.close()
        let limits = settings.limits
        c.start(onFrame: { [weak self] type, body in
            guard let self else { return }
            if type == .snapshot {
                do { self.onSnapshotFrame?(c.peer, try SnapshotFrame.decode(body)) } catch {
                    self.log("event=frame_refused peer=\(c.peer) reason=\"\(error)\"")
                    c.close()
                }
                return
            }
            if type == .forward {
                do { self.onForwardFrame?(c.peer, try ForwardFrame.decode(body)) } catch {
                    self.log("event=frame_refused peer=\(c.peer) reason=\"\(error)\"")
                    c.close()
                }
                return
            }
            guard type == .message else { return }
            do {
                let m = try FrameDecoder(limits: limits).message(body)
                // A peer may only speak for itself, to this site.
                guard m.from == c.peer, m.to == self.settings.site else {
                    self.log("event=frame_refused peer=\(c.peer) reason=\"message from \(m.from) to \(m.to) on \(c.peer)'s connection\"")
                    return
                }
                self.onMessage(m)
            } catch {
                self.log("event=frame_refused peer=\(c.peer) reason=\"\(error)\"")
                c.close()
            }
        }, onClose: { [weak self] reason in
            self?.log("event=peer_disconnected peer=\(c.peer) reason=\"\(reason)\"")
            self?.lock.withLock { if self?.connections[c.peer] === c { self?.connections[c.peer] = nil } }
            self?.dialWake.broadcast()
        })
        log("event=peer_connected peer=\(c.peer) lz4=\(c.compression.rawValue)")
    }

    private func acceptLoop(_ fd: Int32) {
        defer { Glibc.close(fd) }  // the listener is this thread's to close (see stop())
        while true {
            let client = accept(fd, nil, nil)
            if client < 0 {
                let e = errno
                if lock.withLock({ stopped }) { return }
                if e == EBADF || e == EINVAL { return }  // the listener was closed
                // EMFILE, ECONNABORTED, ENOBUFS...: transient; wait a little and go on.
                if e != EINTR { usleep(50_000) }
                continue
            }
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)
            if lock.withLock({ stopped }) {
                Glibc.close(client)
                return
            }
            var one: Int32 = 1
            setsockopt(client, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            let ctx = lock.withLock { context }
            // Refused outright when even the threads are all taken (cut handshakes still
            // finishing included): cutting one for a connection refused anyway would only
            // lose that one too.
            let admitted: Bool = lock.withLock {
                guard handshakesInProgress < Self.handshakeThreads else { return false }
                handshakesInProgress += 1
                return true
            }
            guard admitted else {
                Glibc.close(client)
                metrics.handshakeFailed(.other)
                continue
            }
            let (serial, cuttable) = unprovenHandshakes.enter(client)
            if !cuttable { log("event=handshake_not_cuttable reason=\"dup: out of descriptors\"") }
            let t = Thread { [self] in
                nameCurrentThread("peer-handshake")
                defer {
                    lock.withLock { handshakesInProgress -= 1 }
                    unprovenHandshakes.leave(serial)
                }
                var admittedPeer: SiteID?
                do throws(TransportError) {
                    let c = try PeerConnection.establish(fd: client, context: ctx, isServer: true, expectedPeer: nil,
                                                         expect: settings.expectations, metrics: metrics,
                                                         maxQueuedBytes: settings.maxQueuedBytesPerPeer,
                                                         admit: { peer in
                                                             // A site of the cluster: no longer one a stranger may cut.
                                                             unprovenHandshakes.leave(serial)
                                                             let ok = admit(peer)
                                                             if ok { admittedPeer = peer }
                                                             return ok
                                                         })
                    adopt(c)
                } catch where error.reason == .crossedDial {
                    // Expected when both sides dial at once; the other connection stays.
                } catch {
                    if unprovenHandshakes.wasCut(serial) {
                        log("event=handshake_cut side=server reason=slots_full detail=\"the oldest of \(Self.handshakeSlots) unproven handshakes, cut for a newer connection\"")
                    } else {
                        log("event=handshake_refused side=server reason=\(error.reason.rawValue) detail=\"\(error.detail)\"")
                    }
                }
                if let admittedPeer {
                    lock.withLock {
                        accepting[admittedPeer, default: 1] -= 1
                        if accepting[admittedPeer] == 0 { accepting[admittedPeer] = nil }
                    }
                    dialWake.broadcast()
                }
            }
            t.start()
        }
    }

    /// Handshakes in which the dialer has not yet shown a certificate and hello of this
    /// cluster, at most this many at once; with all taken, a new connection cuts the
    /// oldest (`HandshakeSlots`).
    static let handshakeSlots = 32
    /// Handshake threads at most, cut ones still finishing included.
    static let handshakeThreads = 2 * handshakeSlots

    private func dialLoop(_ peer: SiteID, _ endpoint: PeerEndpoint) {
        var backoff = settings.reconnectMinNanoseconds
        var rng = SeededRandom(seed: monotonicNanoseconds())
        var failedDials = 0
        var lastLogged = ""
        var lastLoggedAt: UInt64 = 0
        var lastEstablished: UInt64?
        // Jittered exponential back-off.
        func backOff() {
            let jitter = backoff / 2 + rng.next() % max(1, backoff / 2)
            usleep(UInt32(min(jitter / 1000, UInt64(UInt32.max))))
            backoff = min(settings.reconnectMaxNanoseconds, backoff * 2)
        }
        while !lock.withLock({ stopped }) {
            let (go, open) = lock.withLock { (mayDialLocked(peer), openLocked(peer)) }
            if !go {
                if let open, monotonicNanoseconds() >= open.establishedAt + settings.duplicateWindowNanoseconds {
                    // A connection that lasted: the next failure starts the back-off afresh.
                    backoff = settings.reconnectMinNanoseconds
                    failedDials = 0
                    lastLogged = ""
                }
                // Woken when a connection closes or an accept ends: the dial starts at once.
                dialWake.lock()
                _ = dialWake.wait(until: Date(timeIntervalSinceNow: 0.05))
                dialWake.unlock()
                continue
            }
            if let e = lastEstablished, monotonicNanoseconds() < e + settings.duplicateWindowNanoseconds {
                // The last connection died young (a peer that accepts, then drops): back
                // off rather than redial at once, again and again.
                lastEstablished = nil
                backOff()
                continue
            }
            do throws(TransportError) {
                let fd = try Self.connect(to: endpoint, timeoutNanoseconds: settings.handshakeTimeoutNanoseconds)
                // Counted as dialing (for `admit`) only once the TCP connection is up, so a
                // dial still waiting for a SYN to a host that is down does not make this
                // site refuse that host's own dial when it comes back; and dropped if the
                // peer's dial was taken meanwhile. The check and the mark are one step under
                // the lock that `admit` takes.
                let proceed: Bool = lock.withLock {
                    guard mayDialLocked(peer) else { return false }
                    dialing.insert(peer)
                    return true
                }
                guard proceed else {
                    Glibc.close(fd)
                    continue
                }
                defer { lock.withLock { _ = dialing.remove(peer) } }
                let ctx = lock.withLock { context }
                let c = try PeerConnection.establish(fd: fd, context: ctx, isServer: false, expectedPeer: peer,
                                                     expect: settings.expectations, metrics: metrics,
                                                     maxQueuedBytes: settings.maxQueuedBytesPerPeer)
                adopt(c)
                lastEstablished = c.establishedAt
            } catch where error.reason == .crossedDial {
                // The peer is dialing this site and keeps its connection: not a failure.
                usleep(UInt32(settings.reconnectMinNanoseconds / 1000))
            } catch {
                // Logged when the reason changes, else every 30 s (with the count), so a
                // peer down for hours does not flood the log.
                let now = monotonicNanoseconds()
                failedDials += 1
                if error.detail != lastLogged || now >= lastLoggedAt + 30_000_000_000 {
                    log("event=dial_failed peer=\(peer) address=\(endpoint.host):\(endpoint.port) reason=\(error.reason.rawValue) detail=\"\(error.detail)\" attempts=\(failedDials)")
                    lastLogged = error.detail
                    lastLoggedAt = now
                }
                backOff()
            }
        }
    }

    // MARK: Sockets

    public static func listen(on endpoint: PeerEndpoint) throws(TransportError) -> Int32 {
        var addr = try socketAddress(endpoint)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TransportError(.other, "socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard rc == 0, Glibc.listen(fd, 64) == 0 else {
            let why = String(cString: strerror(errno))
            Glibc.close(fd)
            throw TransportError(.other, "cannot listen on \(endpoint.host):\(endpoint.port): \(why)")
        }
        return fd
    }

    /// The port a listener got (for port 0 in tests).
    public var boundPort: UInt16? {
        let fd = lock.withLock { listenFD }
        return fd >= 0 ? Self.localPort(of: fd) : nil
    }

    /// The local port of a bound socket (a listener on port 0 gets one from the kernel).
    public static func localPort(of fd: Int32) -> UInt16? {
        var addr = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let rc = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return rc == 0 ? UInt16(bigEndian: addr.sin_port) : nil
    }

    /// A loopback port the kernel picks from its ephemeral range, free at this moment (for
    /// a daemon's internal listener: no configured service expects a port in that range).
    public static func ephemeralLoopbackPort() throws(TransportError) -> UInt16 {
        let fd = try listen(on: PeerEndpoint(host: "127.0.0.1", port: 0))
        defer { Glibc.close(fd) }
        guard let port = localPort(of: fd) else { throw TransportError(.other, "getsockname: \(String(cString: strerror(errno)))") }
        return port
    }

    /// A free loopback port below the ephemeral range (for tests and local clusters).
    public static func freeLoopbackPort() throws(TransportError) -> UInt16 {
        // Below the kernel's ephemeral range (32768 and up): a port the kernel picked for
        // us could be given to some outgoing connection between now and the caller's bind
        // (seen in CI: "Address already in use"). Never the same port twice per process.
        for _ in 0..<500 {
            let port = UInt16.random(in: 20_000..<32_000)
            guard HandedOutPorts.shared.claim(port) else { continue }
            guard let fd = try? listen(on: PeerEndpoint(host: "127.0.0.1", port: port)) else { continue }
            Glibc.close(fd)
            return port
        }
        throw TransportError(.other, "no free loopback port between 20000 and 32000")
    }

    static func socketAddress(_ endpoint: PeerEndpoint) throws(TransportError) -> sockaddr_in {
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = endpoint.port.bigEndian
        let host = endpoint.host == "localhost" ? "127.0.0.1" : endpoint.host
        guard inet_pton(AF_INET, host, &addr.sin_addr) == 1 else {
            throw TransportError(.other, "\(endpoint.host) is not an IPv4 address")
        }
        return addr
    }

    /// A TCP connection with a timeout.
    public static func connect(to endpoint: PeerEndpoint, timeoutNanoseconds: UInt64) throws(TransportError) -> Int32 {
        var addr = try socketAddress(endpoint)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw TransportError(.other, "socket: \(String(cString: strerror(errno)))") }
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        if rc != 0 && errno != EINPROGRESS {
            let why = String(cString: strerror(errno))
            Glibc.close(fd)
            throw TransportError(.closed, "connect to \(endpoint.host):\(endpoint.port): \(why)")
        }
        var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        let ready = poll(&p, 1, Int32(timeoutNanoseconds / 1_000_000))
        var err: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
        guard ready == 1, err == 0 else {
            Glibc.close(fd)
            throw TransportError(ready == 1 ? .closed : .timeout,
                                 "connect to \(endpoint.host):\(endpoint.port): \(ready == 1 ? String(cString: strerror(err)) : "timed out")")
        }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        return fd
    }
}

/// Re-reads the TLS files when they change (the "reload on change" setting): polls their
/// modification times and asks the transport to reload. A failed reload (a half-written
/// file) is logged and retried at the next change; the old files stay in use.
public final class TLSFileWatcher: @unchecked Sendable {
    private let lock = NSLock()
    private var stopped = false  // guarded by `lock`

    public init(transport: Transport, files: TLSFiles, intervalNanoseconds: UInt64 = 5_000_000_000,
                log: @escaping @Sendable (String) -> Void = { _ in }) {
        let paths = [files.certificate, files.privateKey, files.certificateAuthority]
        @Sendable func stamps() -> [Date?] {
            paths.map { (try? FileManager.default.attributesOfItem(atPath: $0))?[.modificationDate] as? Date }
        }
        let thread = Thread { [self] in
            nameCurrentThread("tls-watch")
            var last = stamps()
            while !lock.withLock({ stopped }) {
                usleep(UInt32(min(intervalNanoseconds / 1000, UInt64(UInt32.max))))
                let now = stamps()
                guard now != last else { continue }
                do {
                    try transport.reloadTLS()
                    last = now
                } catch {
                    log("event=tls_reload_failed reason=\"\(error)\"")
                }
            }
        }
        thread.start()
    }

    public func stop() { lock.withLock { stopped = true } }
}

/// Ports `freeLoopbackPort` has handed out in this process.
final class HandedOutPorts: @unchecked Sendable {
    static let shared = HandedOutPorts()
    private let lock = NSLock()
    private var ports: Set<UInt16> = []  // guarded by `lock`
    func claim(_ port: UInt16) -> Bool { lock.withLock { ports.insert(port).inserted } }
}
