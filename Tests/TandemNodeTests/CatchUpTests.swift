import Foundation
import Glibc
import Testing
import TandemCore
import TandemModel
import TandemStore
import TandemTransport
import TandemWAL
@testable import TandemNode

let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

final class LogLines: @unchecked Sendable {
    let lock = NSLock()
    var lines: [String] = []
    func add(_ s: String) { lock.withLock { lines.append(s) } }
    func contains(_ needle: String) -> Bool { lock.withLock { lines.contains { $0.contains(needle) } } }
    func matching(_ needle: String) -> [String] { lock.withLock { lines.filter { $0.contains(needle) } } }
}

/// Three sites on loopback over mutual TLS, each with its own data directory.
final class TestCluster: @unchecked Sendable {
    let dir: String
    let ids: [SiteID] = ["a", "b", "c"]
    let clusterID = ClusterID.random()
    var ports: [SiteID: UInt16] = [:]
    var runtimes: [SiteID: SiteRuntime] = [:]
    let logs = LogLines()
    var configure: (inout NodeSettings) -> Void = { _ in }

    init() throws {
        dir = NSTemporaryDirectory() + "tandem-node-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [repoRoot + "/Deploy/make-certs.sh", dir + "/pki"] + ids.map(\.name)
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        for id in ids {
            ports[id] = try Transport.freeLoopbackPort()
            try SiteRuntime.bootstrap(dataDirectory: dataDir(id), clusterID: clusterID, walOptions: walOptions)
        }
    }

    var walOptions: WALOptions {
        var o = WALOptions()
        o.segmentSize = 256 << 10
        return o
    }

    func dataDir(_ id: SiteID) -> String { dir + "/" + id.name }

    /// The lease; tests that assert on roles at a given instant use a longer one, so a
    /// busy machine does not flip them between two checks.
    var leaseMilliseconds = 600.0

    var config: ClusterConfig {
        var t = Timing()
        t.leaseDuration = .milliseconds(leaseMilliseconds)
        t.heartbeatInterval = .milliseconds(leaseMilliseconds / 4)
        t.electionJitter = .milliseconds(100)
        t.transferTimeout = .milliseconds(2 * leaseMilliseconds)
        var l = Limits()
        // A small cache, so a lagging site is served from the segments on disk.
        l.maxCachedBytes = 1 << 20
        return ClusterConfig(sites: ids.map { SiteDescriptor(id: $0, domain: FailureDomain("dc-\($0)")) }, timing: t, limits: l)
    }

    func start(_ id: SiteID) throws {
        var peers: [SiteID: PeerEndpoint] = [:]
        for p in ids where p != id { peers[p] = PeerEndpoint(host: "127.0.0.1", port: ports[p]!) }
        var ts = TransportSettings(site: id, clusterID: clusterID, listen: PeerEndpoint(host: "127.0.0.1", port: ports[id]!), peers: peers)
        ts.reconnectMinNanoseconds = 20_000_000
        ts.reconnectMaxNanoseconds = 300_000_000
        var s = NodeSettings(config: config, site: id, clusterID: clusterID, dataDirectory: dataDir(id), transport: ts)
        s.walOptions = walOptions
        let logs = self.logs
        s.log = { logs.add($0) }
        configure(&s)
        let tls = try TLSContext(files: TLSFiles(certificate: "\(dir)/pki/\(id).pem", privateKey: "\(dir)/pki/\(id).key",
                                                 certificateAuthority: "\(dir)/pki/ca.pem"))
        let r = try SiteRuntime(settings: s, tls: tls)
        try r.start()
        runtimes[id] = r
    }

    func stop(_ id: SiteID) {
        runtimes[id]?.stop()
        runtimes[id] = nil
    }

    func primary(timeout: Double = 10) -> SiteRuntime? {
        let end = Date().addingTimeInterval(timeout)
        while Date() < end {
            if let p = runtimes.values.first(where: { $0.status.holdsLease }) { return p }
            usleep(20_000)
        }
        return nil
    }

    /// Writes `count` single-row records through the primary, 32 at a time.
    func write(count: Int, from start: Int) async throws {
        let next = Counter(start)
        let limit = start + count
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<32 {
                group.addTask {
                    while true {
                        let k = next.take()
                        if k >= limit { return }
                        var attempts = 0
                        while true {
                            guard let p = self.primary() else { throw WriteError.stopped }
                            do {
                                _ = try await p.write(WriteBatch([SQLStatement("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)",
                                                                               [.integer(Int64(k)), .text("visit-\(k)-\(k % 97)")])]))
                                break
                            } catch {
                                attempts += 1
                                if attempts > 50 { throw error }
                                usleep(20_000)
                            }
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    func waitConverged(timeout: Double) -> Bool {
        let end = Date().addingTimeInterval(timeout)
        while Date() < end {
            let st = runtimes.values.map(\.status)
            if let commit = st.map(\.commitLSN).max(), commit > .zero, st.allSatisfy({ $0.appliedLSN == commit }) { return true }
            usleep(50_000)
        }
        return false
    }

    /// Stops everything and returns each site's state hash and applied LSN.
    func stopAllAndHash() throws -> [SiteID: (String, LSN)] {
        for id in ids { stop(id) }
        var out: [SiteID: (String, LSN)] = [:]
        for id in ids {
            let s = try SiteStorage.open(dataDirectory: dataDir(id), clusterID: clusterID, walOptions: walOptions)
            out[id] = (try s.store.stateHash(), s.store.appliedLSN)
            s.close()
        }
        return out
    }

    func cleanup() { try? FileManager.default.removeItem(atPath: dir) }
}

final class Counter: @unchecked Sendable {
    let lock = NSLock()
    var value: Int
    init(_ v: Int) { value = v }
    func take() -> Int { lock.withLock { defer { value += 1 }; return value } }
}

@Suite("Catch-up over the peer transport", .serialized)
struct CatchUpTests {
    @Test("a site down for 100,000 records catches up from the log on disk and converges")
    func catchUpFromLog() async throws {
        let c = try TestCluster()
        defer { c.cleanup() }
        c.configure = { $0.snapshotEveryRecords = 0 }
        for id in c.ids { try c.start(id) }
        let p = try #require(c.primary())
        _ = try await p.write(WriteBatch([SQLStatement("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")]))
        c.stop("c")
        try await c.write(count: 100_000, from: 0)
        try c.start("c")
        #expect(c.waitConverged(timeout: 120), "\(c.runtimes.values.map(\.status))")
        let hashes = try c.stopAllAndHash()
        #expect(Set(hashes.values.map(\.0)).count == 1, "equal state on every site: \(hashes)")
        #expect(hashes["c"]!.1.rawValue >= 100_002)
    }

    @Test("a site behind the retained log receives a snapshot in chunks, then the log; a transfer cut midway resumes")
    func catchUpBySnapshot() async throws {
        let c = try TestCluster()
        defer { c.cleanup() }
        c.configure = { s in
            s.snapshotEveryRecords = 3000
            // Frequent snapshots whatever the database's size: this is about their transfer.
            s.snapshotLogFraction = 0
            s.retention = .removeAllCovered
            s.snapshotChunkBytes = 16 << 10
            s.snapshotChunkPauseMicroseconds = 20_000
        }
        for id in c.ids { try c.start(id) }
        let p = try #require(c.primary())
        _ = try await p.write(WriteBatch([SQLStatement("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")]))
        c.stop("c")
        try await c.write(count: 30_000, from: 0)
        // The others snapshotted and dropped the log c needs.
        #expect(c.runtimes.values.allSatisfy { $0.status.logFirstLSN > LSN(100) })
        try c.start("c")
        // Cut c while the snapshot is arriving, then bring it back.
        let end = Date().addingTimeInterval(30)
        while Date() < end && !c.logs.contains("event=snapshot_receive site=c") { usleep(10_000) }
        while Date() < end && c.logs.matching("event=snapshot_progress site=c").count < 3 { usleep(5_000) }
        c.stop("c")
        try c.start("c")
        #expect(c.waitConverged(timeout: 120), "\(c.runtimes.values.map(\.status))")
        #expect(c.logs.contains("event=snapshot_installed site=c"))
        let resumed = c.logs.matching("event=snapshot_receive site=c").contains { !$0.hasSuffix("resume_offset=0") }
        #expect(resumed, "the second transfer resumed where the first stopped: \(c.logs.matching("snapshot"))")
        let hashes = try c.stopAllAndHash()
        #expect(Set(hashes.values.map(\.0)).count == 1, "equal state on every site: \(hashes)")
    }

    @Test("a large database is not copied into a snapshot every few records: the log written since must reach half its size",
          arguments: [0.5, 0])
    func snapshotsInProportion(logFraction: Double) async throws {
        let c = try TestCluster()
        defer { c.cleanup() }
        c.configure = { s in
            s.snapshotEveryRecords = 200
            s.snapshotLogFraction = logFraction
        }
        for id in c.ids { try c.start(id) }
        let p = try #require(c.primary())
        // A 6 MiB database: one large document, then small writes (about 100 bytes each in
        // the log, 600 KiB in all, far from half the database).
        let document = (0..<(6 << 20)).map { UInt8(truncatingIfNeeded: ($0 &* 2_654_435_761) >> 13) }
        _ = try await p.write(WriteBatch([SQLStatement("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")]))
        _ = try await p.write(WriteBatch([SQLStatement("CREATE TABLE blobs (id INTEGER PRIMARY KEY, b BLOB)")]))
        _ = try await p.write(WriteBatch([SQLStatement("INSERT INTO blobs (id, b) VALUES (1, ?)", [.blob(document)])]))
        try await c.write(count: 6_000, from: 0)
        #expect(c.waitConverged(timeout: 60))
        // Snapshots are taken on a thread of their own: give the last ones time to end.
        try await Task.sleep(nanoseconds: 1_500_000_000)
        for id in c.ids {
            let taken = c.logs.matching("event=snapshot site=\(id) ").count
            if logFraction > 0 {
                // The first (the document made the log as large as the database), then none.
                #expect(taken >= 1 && taken <= 2, "site \(id): \(taken) snapshots")
            } else {
                // The record count alone: one every 200 records or so, each copying 6 MiB.
                #expect(taken >= 4, "site \(id): \(taken) snapshots")
            }
        }
        let hashes = try c.stopAllAndHash()
        #expect(Set(hashes.values.map(\.0)).count == 1, "equal state on every site: \(hashes)")
    }

    @Test("the snapshot rule: the log since the last snapshot against the database's size")
    func snapshotRule() {
        #expect(SiteRuntime.snapshotDue(loggedBytes: 50, databaseBytes: 100, logFraction: 0.5))
        #expect(!SiteRuntime.snapshotDue(loggedBytes: 49, databaseBytes: 100, logFraction: 0.5))
        #expect(SiteRuntime.snapshotDue(loggedBytes: 0, databaseBytes: 1 << 40, logFraction: 0))
        // A log that shrank (a truncation, a reset) is no growth, not a negative one.
        #expect(!SiteRuntime.snapshotDue(loggedBytes: -5_000, databaseBytes: 100, logFraction: 0.5))
        // An unknown database size (0) leaves the record count to decide.
        #expect(SiteRuntime.snapshotDue(loggedBytes: 0, databaseBytes: 0, logFraction: 0.5))
    }
}

@Suite("Back-pressure", .serialized)
struct BackPressureTests {
    @Test("a stalled peer (connected, never reading) does not block the primary's writes or its other peers")
    func stalledPeer() async throws {
        let c = try TestCluster()
        defer { c.cleanup() }
        c.configure = { $0.snapshotEveryRecords = 0 }
        // "c" is an impostor with c's certificate that completes the handshakes and then
        // never reads a byte: its TCP buffers fill, then the senders' queues.
        let listener = try Transport.listen(on: PeerEndpoint(host: "127.0.0.1", port: c.ports["c"]!))
        defer { close(listener) }
        let tls = try TLSContext(files: TLSFiles(certificate: "\(c.dir)/pki/c.pem", privateKey: "\(c.dir)/pki/c.key",
                                                 certificateAuthority: "\(c.dir)/pki/ca.pem"))
        final class Held: @unchecked Sendable {
            let lock = NSLock()
            var connections: [PeerConnection] = []
        }
        let held = Held()
        let clusterID = c.clusterID
        Thread {
            for _ in 0..<2 {
                let fd = accept(listener, nil, nil)
                guard fd >= 0 else { return }
                let expect = HandshakeExpectations(clusterID: clusterID, localSite: "c", knownSites: ["a", "b", "c"])
                if let conn = try? PeerConnection.establish(fd: fd, context: tls, isServer: true, expectedPeer: nil, expect: expect,
                                                            metrics: TransportMetrics(), maxQueuedBytes: 1 << 20) {
                    held.lock.withLock { held.connections.append(conn) }  // never started: never reads
                }
            }
        }.start()
        try c.start("a")
        try c.start("b")
        let p = try #require(c.primary())
        _ = try await p.write(WriteBatch([SQLStatement("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")]))
        let started = Date()
        // 2 KiB rows: well over the 64 MiB a peer may have queued.
        let blob = String(repeating: "x", count: 2048)
        let done = Counter(0)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for w in 0..<32 {
                group.addTask {
                    for i in 0..<1200 {
                        guard let p = c.primary() else { throw WriteError.stopped }
                        _ = try await p.write(WriteBatch([SQLStatement("INSERT INTO kv (k, v) VALUES (?, ?)", [.integer(Int64(w * 10_000 + i)), .text(blob)])]))
                        _ = done.take()
                    }
                }
            }
            try await group.waitForAll()
        }
        let seconds = Date().timeIntervalSince(started)
        #expect(done.value == 38_400)
        #expect(seconds < 120, "writes kept committing on the two live sites (\(seconds) s)")
        #expect(held.lock.withLock { held.connections.count } >= 1, "the stalled peer was connected")
        // The core's in-flight budget per peer (8 MiB, 64 messages) bounds what waits for
        // the stalled peer, well before the transport's 64 MiB queue.
        #expect(c.waitConverged(timeout: 30))
        let hashes = try c.stopAllAndHash()
        #expect(hashes["a"]!.1 == hashes["b"]!.1 && hashes["a"]!.0 == hashes["b"]!.0)
        held.lock.withLock { for h in held.connections { h.close() } }
    }
}
