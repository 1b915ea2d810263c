import Foundation
import Glibc

/// HAProxy in front of a local cluster, configured as Deploy/haproxy/haproxy.cfg (plain
/// HTTP variant): writes to the site answering 200 on /primary, reads to the sites
/// answering 200 on /read-only, HEAD checks with fall/rise counts and
/// `on-marked-down shutdown-sessions`. Every site is also a backup for writes, so while
/// no site passes /primary (an election) writes go to a site that waits for the next
/// primary and forwards: clients see a pause, not an error.
public final class HAProxyFront: @unchecked Sendable {
    public let writePort: UInt16
    public let readPort: UInt16
    private let process: Process
    public let configPath: String

    public static var isInstalled: Bool { path != nil }
    static var path: String? {
        ["/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy"].first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    public init(cluster: LocalCluster) throws {
        guard let haproxy = Self.path else { throw DrillError("haproxy is not installed (Deploy/setup.sh installs it)") }
        writePort = try cluster.freePort()
        readPort = try cluster.freePort()
        configPath = cluster.dir + "/haproxy.cfg"
        var servers = "", backups = "", readers = ""
        for s in cluster.options.sites {
            let port = cluster.httpPorts[s]!
            servers += "    server \(s) 127.0.0.1:\(port) check\n"
            backups += "    server \(s)-any 127.0.0.1:\(port) backup\n"
            readers += "    server \(s) 127.0.0.1:\(port) check\n"
        }
        let config = """
            global
                maxconn 2048
            defaults
                mode http
                timeout connect 1s
                timeout client 30s
                timeout server 30s
                timeout queue 10s
                retries 2
                option redispatch
                default-server inter 200ms fastinter 100ms downinter 500ms fall 2 rise 2 on-marked-down shutdown-sessions
            frontend writes
                bind 127.0.0.1:\(writePort)
                default_backend tandem_primary
            frontend reads
                bind 127.0.0.1:\(readPort)
                default_backend tandem_read_only
            backend tandem_primary
                option httpchk
                http-check send meth HEAD uri /primary
                http-check expect status 200
            \(servers)\(backups)
            backend tandem_read_only
                balance roundrobin
                option httpchk
                http-check send meth HEAD uri /read-only
                http-check expect status 200
            \(readers)
            """
        try config.write(toFile: configPath, atomically: true, encoding: .utf8)
        process = Process()
        process.executableURL = URL(fileURLWithPath: haproxy)
        process.arguments = ["-db", "-f", configPath]
        let log = FileHandle(forWritingAtPath: cluster.dir + "/haproxy.log") ?? FileHandle.nullDevice
        process.standardOutput = log
        process.standardError = log
        if !FileManager.default.fileExists(atPath: cluster.dir + "/haproxy.log") {
            _ = FileManager.default.createFile(atPath: cluster.dir + "/haproxy.log", contents: nil)
        }
        try process.run()
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
