import Foundation
import Glibc

/// HAProxy in front of a local cluster, run from Deploy/haproxy/haproxy-plain.cfg with its
/// addresses replaced by the cluster's loopback ports: writes to the site answering 200 on
/// /primary (any live site during an election), reads to the sites answering 200 on
/// /read-only, HEAD checks with fall/rise counts and `on-marked-down shutdown-sessions`.
public final class HAProxyFront: @unchecked Sendable {
    public let writePort: UInt16
    public let readPort: UInt16
    private let process: Process
    public let configPath: String
    /// Where haproxy writes its log (requests and server state changes).
    public let logPath: String

    public static var isInstalled: Bool { path != nil }
    static var path: String? {
        ["/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy"].first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// `deployDirectory`: where haproxy/haproxy-plain.cfg is. The cluster's sites must be
    /// sbg, gra and rbx, as in that file.
    public init(cluster: LocalCluster, deployDirectory: String) throws {
        guard let haproxy = Self.path else { throw DrillError("haproxy is not installed (Deploy/setup.sh installs it)") }
        let template = deployDirectory + "/haproxy/haproxy-plain.cfg"
        guard var config = FileManager.default.contents(atPath: template).map({ String(decoding: $0, as: UTF8.self) }) else {
            throw DrillError("cannot read \(template)")
        }
        writePort = try cluster.freePort()
        readPort = try cluster.freePort()
        let addresses = ["sbg": "10.10.1.10:8401", "gra": "10.20.1.10:8401", "rbx": "10.30.1.10:8401"]
        for (site, address) in addresses {
            guard let port = cluster.httpPorts[site] else { throw DrillError("the HAProxy drill needs sites sbg, gra and rbx") }
            config = config.replacingOccurrences(of: address, with: "127.0.0.1:\(port)")
        }
        config = config.replacingOccurrences(of: "bind :8080", with: "bind 127.0.0.1:\(writePort)")
            .replacingOccurrences(of: "bind :8081", with: "bind 127.0.0.1:\(readPort)")
            // The log (one line per request and per server state change) goes to
            // haproxy.log beside the sites' logs: haproxy runs in the foreground.
        configPath = cluster.dir + "/haproxy.cfg"
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
        logPath = cluster.dir + "/haproxy.log"
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = FileHandle(forWritingAtPath: logPath) ?? FileHandle.nullDevice
        process = Process()
        process.executableURL = URL(fileURLWithPath: haproxy)
        process.arguments = ["-db", "-f", configPath]
        process.standardOutput = log
        process.standardError = log
        try process.run()
        // It must be up: listening on the write port within a few seconds.
        for _ in 0..<100 {
            guard process.isRunning else { throw DrillError("haproxy exited at start; see \(logPath)") }
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            let ok = withLoopback(port: writePort) { connect(fd, $0, $1) } == 0
            Glibc.close(fd)
            if ok { return }
            usleep(50_000)
        }
        throw DrillError("haproxy did not listen on 127.0.0.1:\(writePort); see \(logPath)")
    }

    public var writeURL: String { "http://127.0.0.1:\(writePort)" }
    public var readURL: String { "http://127.0.0.1:\(readPort)" }

    public func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }
}
