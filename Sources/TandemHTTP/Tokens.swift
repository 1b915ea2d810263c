import Foundation
import Synchronization
import TandemStore

/// What a token allows. Each scope includes the ones before it.
public enum Scope: Int, Comparable, Sendable, CustomStringConvertible {
    /// Queries, lists, downloads, exports, status.
    case read = 1
    /// Also writes: execute, bookings, uploads.
    case write = 2
    /// Also operations on the cluster: switchover.
    case admin = 3

    public init?(name: String) {
        switch name {
        case "read": self = .read
        case "write": self = .write
        case "admin": self = .admin
        default: return nil
        }
    }

    public var description: String { ["", "read", "write", "admin"][rawValue] }
    public static func < (a: Scope, b: Scope) -> Bool { a.rawValue < b.rawValue }
}

/// The API tokens of a site, read from its token file, which holds only their SHA-256:
///
///     # name          scope   sha256 of the token
///     booking-portal  write   5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
///
/// A stolen token file does not give the tokens away. Re-read on SIGHUP.
public final class TokenStore: Sendable {
    public struct Entry: Sendable {
        public var name: String
        public var scope: Scope
    }

    private let path: String?
    private let entries: Mutex<[String: Entry]>

    /// A store with no file: every data API call is refused with 401.
    public init(path: String?) throws(TokenFileError) {
        self.path = path
        if let path { entries = Mutex(try Self.load(path)) } else { entries = Mutex([:]) }
    }

    public init(entries: [String: Entry]) {
        path = nil
        self.entries = Mutex(entries)
    }

    public var isConfigured: Bool { path != nil || !entries.withLock { $0.isEmpty } }

    /// Re-reads the file; on error the tokens in use stay as they were.
    public func reload() throws(TokenFileError) {
        guard let path else { return }
        let fresh = try Self.load(path)
        entries.withLock { $0 = fresh }
    }

    /// The entry for a presented token, if it is known.
    public func entry(forToken token: String) -> Entry? {
        let hash = SHA256Hasher.hex(SHA256Hasher.digest(Array(token.utf8)))
        return entries.withLock { $0[hash] }
    }

    /// The line to add to a token file for `token`.
    public static func line(name: String, scope: Scope, token: String) -> String {
        "\(name) \(scope) \(SHA256Hasher.hex(SHA256Hasher.digest(Array(token.utf8))))"
    }

    /// A new random token (256 bits from the system's generator).
    public static func generate() -> String {
        var g = SystemRandomNumberGenerator()
        return "tdm_" + (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &g)) }.joined()
    }

    static func load(_ path: String) throws(TokenFileError) -> [String: Entry] {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw TokenFileError(file: path, line: nil, reason: "cannot read the file")
        }
        var out: [String: Entry] = [:]
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            let parts = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
            guard parts.count == 3 else {
                throw TokenFileError(file: path, line: i + 1, reason: "expected three fields: name, scope (read, write or admin), sha256 of the token")
            }
            guard let scope = Scope(name: parts[1]) else {
                throw TokenFileError(file: path, line: i + 1, reason: "scope must be read, write or admin, found \"\(parts[1])\"")
            }
            let hash = parts[2].lowercased()
            guard hash.count == 64, hash.allSatisfy({ $0.isHexDigit }) else {
                throw TokenFileError(file: path, line: i + 1, reason: "the third field must be the token's SHA-256 in hex (64 digits), never the token itself")
            }
            out[hash] = Entry(name: parts[0], scope: scope)
        }
        return out
    }
}

/// A token file that does not hold.
public struct TokenFileError: Error, CustomStringConvertible, Sendable {
    public let file: String
    public let line: Int?
    public let reason: String
    public var description: String { "\(file)\(line.map { ":\($0)" } ?? ""): \(reason)" }
}
