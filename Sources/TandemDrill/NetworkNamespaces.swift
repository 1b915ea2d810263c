import Foundation
import Glibc

/// One network namespace per site, each joined by a veth link to a bridge in the host's
/// namespace (where the drill's clients run): real network stacks, and a partition is a
/// link brought down. Needs root and the `ip` command (iproute2); everything made is
/// removed by `remove()`, also after a failed setup.
public final class NetworkNamespaces: @unchecked Sendable {
    public let tag: String
    public let subnet: String
    public let sites: [String]
    private(set) var made: [[String]] = []  // undo commands, in reverse order of creation

    /// Whether this process may make namespaces (root, and `ip netns` works).
    public static var available: Bool {
        guard getuid() == 0, let ip = ipPath else { return false }
        return run([ip, "netns", "list"]) == 0
    }

    static var ipPath: String? { ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].first { FileManager.default.isExecutableFile(atPath: $0) } }

    public init(sites: [String]) throws {
        guard let ip = Self.ipPath else { throw DrillError("the ip command (iproute2) is missing") }
        var rng = SystemRandomNumberGenerator()
        tag = String(format: "%04x", UInt16.random(in: 0...0xFFFF, using: &rng))
        subnet = "10.201.\(UInt8.random(in: 1...250, using: &rng))"
        self.sites = sites
        do {
            let bridge = "tdmbr\(tag)"
            try step([ip, "link", "add", bridge, "type", "bridge"], undo: [ip, "link", "del", bridge])
            try step([ip, "addr", "add", "\(subnet).1/24", "dev", bridge])
            try step([ip, "link", "set", bridge, "up"])
            for (i, s) in sites.enumerated() {
                let ns = namespace(s), host = hostLink(i)
                try step([ip, "netns", "add", ns], undo: [ip, "netns", "del", ns])
                try step([ip, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns], undo: [ip, "link", "del", host])
                try step([ip, "link", "set", host, "master", bridge])
                try step([ip, "link", "set", host, "up"])
                try step([ip, "netns", "exec", ns, ip, "addr", "add", "\(address(s))/24", "dev", "eth0"])
                try step([ip, "netns", "exec", ns, ip, "link", "set", "eth0", "up"])
                try step([ip, "netns", "exec", ns, ip, "link", "set", "lo", "up"])
            }
        } catch {
            remove()
            throw error
        }
    }

    public func namespace(_ site: String) -> String { "tdm\(tag)-\(site)" }
    func hostLink(_ i: Int) -> String { "tdv\(tag)\(i)" }

    /// The site's address on the bridge.
    public func address(_ site: String) -> String {
        "\(subnet).\(10 + (sites.firstIndex(of: site) ?? 0))"
    }

    /// The command that runs `argv` inside the site's namespace.
    public func wrap(_ site: String, _ argv: [String]) -> [String] {
        [Self.ipPath ?? "ip", "netns", "exec", namespace(site)] + argv
    }

    /// Takes the site's link down (cut off from every other site and from the clients), or up.
    public func setLink(_ site: String, up: Bool) {
        guard let i = sites.firstIndex(of: site), let ip = Self.ipPath else { return }
        _ = Self.run([ip, "link", "set", hostLink(i), up ? "up" : "down"])
    }

    public func remove() {
        for undo in made.reversed() { _ = Self.run(undo) }
        made = []
    }

    private func step(_ argv: [String], undo: [String]? = nil) throws {
        let rc = Self.run(argv)
        guard rc == 0 else { throw DrillError("\(argv.joined(separator: " ")) failed (\(rc))") }
        if let undo { made.append(undo) }
    }

    @discardableResult
    static func run(_ argv: [String]) -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: argv[0])
        p.arguments = Array(argv.dropFirst())
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        do { try p.run() } catch { return -1 }
        p.waitUntilExit()
        return p.terminationStatus
    }
}
