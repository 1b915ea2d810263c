import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Testing
import TandemCore
import TandemHTTP
import TandemModel
import TandemTransport
@testable import TandemNode

/// One HTTP request; returns the status code.
func httpStatus(_ method: String, _ url: String) async throws -> Int {
    var request = URLRequest(url: URL(string: url)!)
    request.httpMethod = method
    request.timeoutInterval = 5
    let (_, response) = try await URLSession.shared.data(for: request)
    return (response as? HTTPURLResponse)?.statusCode ?? 0
}

@Suite("Health probes", .serialized)
struct ProbeTests {
    @Test("each probe answers with Patroni's meaning in each role, through GET, HEAD and OPTIONS")
    func probesByRole() async throws {
        let c = try TestCluster()
        defer { c.cleanup() }
        c.leaseMilliseconds = 2000
        c.configure = { $0.snapshotEveryRecords = 0 }
        for id in c.ids { try c.start(id) }
        var http: [SiteID: Int] = [:]
        var servers: [Task<Void, Never>] = []
        for id in c.ids {
            let port = Int(try Transport.freeLoopbackPort())
            http[id] = port
            let router = makeRouter(runtime: c.runtimes[id]!, site: id, defaultLag: LagThreshold(records: 1000), sites: c.config.sites)
            servers.append(Task { try? await runHTTP(router: router, host: "127.0.0.1", port: port) })
        }
        defer { for s in servers { s.cancel() } }
        let primary = try #require(c.primary())
        // Wait for the HTTP servers to come up (the machine may be busy) and the replicas to
        // hear the primary.
        for id in c.ids {
            var up = false
            for _ in 0..<200 where !up {
                up = (try? await httpStatus("GET", "http://127.0.0.1:\(http[id]!)/liveness")) == 200
                if !up { try await Task.sleep(for: .milliseconds(50)) }
            }
            #expect(up, "the HTTP server of \(id) came up")
        }
        try await Task.sleep(for: .milliseconds(400))
        for id in c.ids {
            let isPrimary = id == primary.settings.site
            for method in ["GET", "HEAD", "OPTIONS"] {
                let base = "http://127.0.0.1:\(http[id]!)"
                #expect(try await httpStatus(method, base + "/primary") == (isPrimary ? 200 : 503), "\(method) /primary on \(id)")
                #expect(try await httpStatus(method, base + "/leader") == (isPrimary ? 200 : 503))
                #expect(try await httpStatus(method, base + "/replica") == (isPrimary ? 503 : 200), "\(method) /replica on \(id)")
                #expect(try await httpStatus(method, base + "/read-only") == 200)
                #expect(try await httpStatus(method, base + "/health") == 200)
                #expect(try await httpStatus(method, base + "/liveness") == 200)
            }
        }
        // A malformed lag is a 400 that names the problem; a lag of 0 records is honoured.
        let replica = try #require(c.ids.first { $0 != primary.settings.site })
        #expect(try await httpStatus("GET", "http://127.0.0.1:\(http[replica]!)/replica?lag=16MB") == 400)
        // The primary stops answering 200 once it is cut off (no lease), and another takes over.
        let old = primary.settings.site
        c.stop(old)
        try await Task.sleep(for: .milliseconds(1000))
        let newPrimary = try #require(c.primary(timeout: 15))
        #expect(newPrimary.settings.site != old)
        #expect(try await httpStatus("GET", "http://127.0.0.1:\(http[newPrimary.settings.site]!)/primary") == 200)
        _ = try c.stopAllAndHash()
    }
}
