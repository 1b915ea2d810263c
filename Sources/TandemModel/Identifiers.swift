import Foundation

/// A log sequence number: the position of a record in the replicated log. LSN 0 means
/// "before the first record"; the first record has LSN 1.
public struct LSN: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { self.rawValue = value }
    public static let zero = LSN(0)
    public static func < (a: LSN, b: LSN) -> Bool { a.rawValue < b.rawValue }
    public var next: LSN { LSN(rawValue + 1) }
    public var previous: LSN { LSN(rawValue == 0 ? 0 : rawValue - 1) }
    public var description: String { String(rawValue) }
}

/// An election term. Terms only go up; they fence a deposed primary's late messages.
public struct Term: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { self.rawValue = value }
    public static let zero = Term(0)
    public static func < (a: Term, b: Term) -> Bool { a.rawValue < b.rawValue }
    public var description: String { String(rawValue) }
}

/// The identity of one replicated database. Every segment, snapshot and peer handshake
/// carries it, so files from another cluster are never mixed in.
public struct ClusterID: Hashable, Sendable, CustomStringConvertible {
    public let bytes: [UInt8]

    public init(uuid: UUID) {
        let u = uuid.uuid
        bytes = [u.0, u.1, u.2, u.3, u.4, u.5, u.6, u.7, u.8, u.9, u.10, u.11, u.12, u.13, u.14, u.15]
    }

    /// Parses the canonical UUID text form.
    public init?(_ text: String) {
        guard let uuid = UUID(uuidString: text) else { return nil }
        self.init(uuid: uuid)
    }

    public init?(bytes: [UInt8]) {
        guard bytes.count == 16 else { return nil }
        self.bytes = bytes
    }

    public static func random() -> ClusterID { ClusterID(uuid: UUID()) }

    public var description: String {
        let b = bytes
        let uuid = UUID(uuid: (b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]))
        return uuid.uuidString.lowercased()
    }
}
