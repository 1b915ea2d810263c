import Foundation
import Glibc
import Testing
import TandemCore
import TandemModel
@testable import TandemTransport

let clusterA = ClusterID("8f2a1c3e-0d4b-4e6f-9a7b-1c2d3e4f5a6b")!

func context(_ cert: String, ca: String = "ca") throws -> TLSContext {
    let pki = TestPKI.shared
    return try TLSContext(files: TLSFiles(certificate: pki.path("\(cert).pem"), privateKey: pki.path("\(cert).key"),
                                          certificateAuthority: pki.path("\(ca).pem")))
}

final class Outcome: @unchecked Sendable {
    let lock = NSLock()
    var result: Result<PeerConnection, TransportError>?
    let done = DispatchSemaphore(value: 0)
}

/// One server handshake on a loopback port against one client handshake; returns both
/// outcomes.
func handshake(server: TLSContext, client: TLSContext, serverSite: SiteID = "b", clientSite: SiteID = "a",
               clientClaims: SiteID? = nil, dial: SiteID = "b", serverCluster: ClusterID = clusterA, clientCluster: ClusterID = clusterA,
               clientVersion: UInt16 = Wire.protocolVersion, clientChunks: Bool = true, keepOpen: Bool = false) throws -> (server: Result<PeerConnection, TransportError>, client: Result<PeerConnection, TransportError>) {
    let listener = try Transport.listen(on: PeerEndpoint(host: "127.0.0.1", port: 0))
    defer { Glibc.close(listener) }
    let port = try #require(Transport.localPort(of: listener))
    let metrics = TransportMetrics()
    let sites: Set<SiteID> = ["a", "b", "c"]
    let outcome = Outcome()
    let serverExpect = HandshakeExpectations(clusterID: serverCluster, localSite: serverSite, knownSites: sites)
    Thread {
        let fd = accept(listener, nil, nil)
        let r: Result<PeerConnection, TransportError>
        do throws(TransportError) {
            r = .success(try PeerConnection.establish(fd: fd, context: server, isServer: true, expectedPeer: nil, expect: serverExpect,
                                                      metrics: metrics, maxQueuedBytes: 1 << 20))
        } catch { r = .failure(error) }
        outcome.lock.withLock { outcome.result = r }
        outcome.done.signal()
    }.start()
    var clientExpect = HandshakeExpectations(clusterID: clientCluster, localSite: clientClaims ?? clientSite, knownSites: sites)
    clientExpect.protocolVersion = clientVersion
    clientExpect.lz4Chunks = clientChunks
    clientExpect.timeoutNanoseconds = 3_000_000_000
    let clientResult: Result<PeerConnection, TransportError>
    do throws(TransportError) {
        let fd = try Transport.connect(to: PeerEndpoint(host: "127.0.0.1", port: port), timeoutNanoseconds: 2_000_000_000)
        clientResult = .success(try PeerConnection.establish(fd: fd, context: client, isServer: false, expectedPeer: dial, expect: clientExpect,
                                                             metrics: TransportMetrics(), maxQueuedBytes: 1 << 20))
    } catch { clientResult = .failure(error) }
    if !keepOpen, case let .success(c) = clientResult { c.close() }
    outcome.done.wait()
    let serverResult = outcome.lock.withLock { outcome.result! }
    if !keepOpen, case let .success(c) = serverResult { c.close() }
    return (serverResult, clientResult)
}

func reason(_ r: Result<PeerConnection, TransportError>) -> HandshakeFailure? {
    if case let .failure(e) = r { return e.reason }
    return nil
}

@Suite("TLS and application handshake", .serialized)
struct HandshakeTests {
    @Test("two sites of the cluster connect, each checking the other's certificate and hello")
    func good() throws {
        let r = try handshake(server: try context("b"), client: try context("a"))
        guard case let .success(s) = r.server, case let .success(c) = r.client else {
            Issue.record("handshake failed: \(r)")
            return
        }
        #expect(s.peer == "a" && c.peer == "b")
        #expect(s.compression == .lz4Chunks && c.compression == .lz4Chunks, "LZ4 chunks negotiated")
    }

    @Test("a site that predates LZ4 chunks gets one LZ4 block per record block from a newer one")
    func olderPeer() throws {
        let r = try handshake(server: try context("b"), client: try context("a"), clientChunks: false)
        guard case let .success(s) = r.server, case let .success(c) = r.client else {
            Issue.record("handshake failed: \(r)")
            return
        }
        #expect(s.compression == .lz4Block && c.compression == .lz4Block)
    }

    @Test("a connection closed here hands over no frame it read after the close")
    func closedConnectionDeliversNothingMore() async throws {
        let r = try handshake(server: try context("b"), client: try context("a"), keepOpen: true)
        guard case let .success(server) = r.server, case let .success(client) = r.client else {
            Issue.record("handshake failed: \(r)")
            return
        }
        defer { client.close(); server.close() }
        client.start(onFrame: { _, _ in }, onClose: { _ in })
        // 200 small frames wait in the server's socket before it starts reading, so one
        // read takes them all.
        for n in 0..<200 { client.send(WireEncoder.frame(.forward, [UInt8(n & 0xFF)])) }
        try await Task.sleep(nanoseconds: 300_000_000)
        final class Count: @unchecked Sendable {
            let lock = NSLock()
            var delivered = 0
        }
        let count = Count()
        let closed = DispatchSemaphore(value: 0)
        server.start(onFrame: { _, _ in
            // The first frame makes this side drop the connection (as a newer one replacing it would).
            let first = count.lock.withLock { count.delivered += 1; return count.delivered == 1 }
            if first { server.close() }
        }, onClose: { _ in closed.signal() })
        await onThread { _ = closed.wait(timeout: .now() + 5) }
        #expect(count.lock.withLock { count.delivered } == 1, "frames handed over after the close")
    }

    @Test("frames sent from several threads arrive whole and in each sender's order, whether written on the sender's thread or by the connection's")
    func sendOrder() async throws {
        let r = try handshake(server: try context("b"), client: try context("a"), keepOpen: true)
        guard case let .success(server) = r.server, case let .success(client) = r.client else {
            Issue.record("handshake failed: \(r)")
            return
        }
        defer { client.close(); server.close() }
        final class Seen: @unchecked Sendable {
            let lock = NSLock()
            var last: [UInt8: Int] = [:]
            var count = 0
            var broken: [String] = []
        }
        let seen = Seen()
        server.start(onFrame: { type, body in
            seen.lock.withLock {
                // body: sender, 4-byte sequence number, then filler of a known value.
                guard type == .forward, body.count >= 5 else { seen.broken.append("type \(type), \(body.count) bytes"); return }
                let sender = body[0]
                let n = Int(body[1]) << 24 | Int(body[2]) << 16 | Int(body[3]) << 8 | Int(body[4])
                if n != (seen.last[sender] ?? -1) + 1 { seen.broken.append("sender \(sender): \(n) after \(seen.last[sender] ?? -1)") }
                if body.dropFirst(5).contains(where: { $0 != sender }) { seen.broken.append("sender \(sender) frame \(n) corrupted") }
                seen.last[sender] = n
                seen.count += 1
            }
        }, onClose: { _ in })
        client.start(onFrame: { _, _ in }, onClose: { _ in })
        let senders = 4, perSender = 800
        await withTaskGroup(of: Void.self) { group in
            for sender in 0..<senders {
                group.addTask {
                    await onThread {
                        for n in 0..<perSender {
                            // Small frames go out on this thread; 64-256 KiB ones fill the
                            // socket, so the connection's thread must finish them.
                            let size = n % 5 == 0 ? (64 << 10) * (1 + n % 4) : 10 + n % 200
                            var body = [UInt8](repeating: UInt8(sender), count: 5 + size)
                            body[1] = UInt8(n >> 24 & 0xFF); body[2] = UInt8(n >> 16 & 0xFF); body[3] = UInt8(n >> 8 & 0xFF); body[4] = UInt8(n & 0xFF)
                            let frame = WireEncoder.frame(.forward, body)
                            // A full queue refuses (the protocol would re-send): wait and retry,
                            // unless the connection closed (then the test fails, below).
                            while !client.send(frame) {
                                if !client.isOpen { return }
                                usleep(1000)
                            }
                        }
                    }
                }
            }
        }
        let deadline = Date().addingTimeInterval(30)
        while seen.lock.withLock({ seen.count }) < senders * perSender && Date() < deadline { try await Task.sleep(nanoseconds: 10_000_000) }
        #expect(client.isOpen && server.isOpen, "the connection stayed up")
        seen.lock.withLock {
            #expect(seen.count == senders * perSender)
            #expect(seen.broken.isEmpty, "\(seen.broken.prefix(5))")
        }
    }

    @Test("a certificate from another CA is refused during the handshake")
    func otherCA() throws {
        let r = try handshake(server: try context("b"), client: try context("a-other"))
        #expect(reason(r.server) == .unknownCertificateAuthority, "\(r.server)")
        #expect(reason(r.client) != nil)
    }

    @Test("an expired certificate is refused with that reason")
    func expired() throws {
        let r = try handshake(server: try context("b"), client: try context("a-expired"))
        #expect(reason(r.server) == .certificateExpired, "\(r.server)")
    }

    @Test("a certificate not yet valid is refused with that reason")
    func notYetValid() throws {
        let r = try handshake(server: try context("b"), client: try context("a-future"))
        #expect(reason(r.server) == .certificateNotYetValid, "\(r.server)")
    }

    @Test("a site claiming another site's name than its certificate's is refused")
    func wrongClaim() throws {
        let r = try handshake(server: try context("b"), client: try context("a"), clientClaims: "c")
        #expect(reason(r.server) == .wrongSiteName, "\(r.server)")
    }

    @Test("a server whose certificate does not name the site dialed is refused by the client")
    func wrongServerName() throws {
        let r = try handshake(server: try context("c"), client: try context("a"), serverSite: "c", dial: "b")
        #expect(reason(r.client) == .wrongSiteName, "\(r.client)")
    }

    @Test("a peer of another cluster is refused")
    func wrongCluster() throws {
        let r = try handshake(server: try context("b"), client: try context("a"), clientCluster: ClusterID.random())
        #expect(reason(r.server) == .wrongCluster, "\(r.server)")
    }

    @Test("an unknown protocol version is refused")
    func unknownVersion() throws {
        let r = try handshake(server: try context("b"), client: try context("a"), clientVersion: 99)
        #expect(reason(r.server) == .unknownProtocolVersion, "\(r.server)")
    }

    @Test("a plaintext client is refused, and the refusal is counted")
    func plaintext() throws {
        let metrics = TransportMetrics()
        let listener = try Transport.listen(on: PeerEndpoint(host: "127.0.0.1", port: 0))
        defer { Glibc.close(listener) }
        let port = try #require(Transport.localPort(of: listener))
        let server = try context("b")
        let outcome = Outcome()
        Thread {
            let fd = accept(listener, nil, nil)
            let r: Result<PeerConnection, TransportError>
            do throws(TransportError) {
                r = .success(try PeerConnection.establish(fd: fd, context: server, isServer: true, expectedPeer: nil,
                                                          expect: HandshakeExpectations(clusterID: clusterA, localSite: "b", knownSites: ["a", "b"]),
                                                          metrics: metrics, maxQueuedBytes: 1 << 20))
            } catch { r = .failure(error) }
            outcome.lock.withLock { outcome.result = r }
            outcome.done.signal()
        }.start()
        let fd = try Transport.connect(to: PeerEndpoint(host: "127.0.0.1", port: port), timeoutNanoseconds: 2_000_000_000)
        let request = Array("GET /status HTTP/1.1\r\nHost: b\r\n\r\n".utf8)
        _ = request.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        outcome.done.wait()
        Glibc.close(fd)
        let r = outcome.lock.withLock { outcome.result! }
        #expect(reason(r) == .plaintextPeer, "\(r)")
        #expect(metrics.handshakeFailures[.plaintextPeer] == 1)
    }

    @Test("a client without a certificate is refused")
    func noCertificate() throws {
        // A context with only the CA: presents no certificate.
        let pki = TestPKI.shared
        let r = try handshake(server: try context("b"), client: try BareClientContext.make(ca: pki.path("ca.pem")))
        #expect(reason(r.server) == .noCertificate, "\(r.server)")
    }
}

/// A client context without a certificate, to show the server requires one.
enum BareClientContext {
    static func make(ca: String) throws -> TLSContext { try TLSContext.withoutCertificate(certificateAuthority: ca) }
}

/// Runs a blocking body on a thread of its own (not one of Swift's few pool threads).
func onThread(_ body: @escaping @Sendable () -> Void) async {
    await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
        Thread { body(); c.resume() }.start()
    }
}
