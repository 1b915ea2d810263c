import Foundation
import Logging
import TandemModel

/// One line per event on standard error: `key=value` pairs, or a JSON object, as the
/// configuration's `logging.format` says. The daemon's parts report events as
/// `event=name key=value key="quoted value"` text; it becomes structured metadata here.
struct LineLogHandler: LogHandler {
    let json: Bool
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var fields: [(String, String)] = [("time", Self.timestamp()), ("level", event.level.rawValue)]
        for (k, v) in metadata.sorted(by: { $0.key < $1.key }) { fields.append((k, "\(v)")) }
        let message = event.message.description
        let parsed = Self.parse(message)
        if parsed.isEmpty { fields.append(("message", message)) } else { fields += parsed }
        for (k, v) in (event.metadata ?? [:]).sorted(by: { $0.key < $1.key }) { fields.append((k, "\(v)")) }
        let line: String
        if json {
            var object: [String: String] = [:]
            for (k, v) in fields { object[k] = v }
            line = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]))
                .map { String(decoding: $0, as: UTF8.self) } ?? message
        } else {
            line = fields.map { k, v in
                v.isEmpty || v.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" })
                    ? "\(k)=\"\(v.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\""))\"" : "\(k)=\(v)"
            }.joined(separator: " ")
        }
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }

    static func timestamp() -> String {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return f.string(from: Date())
    }

    /// `a=1 b="two words" c=x` → [(a, 1), (b, two words), (c, x)]; [] if the text is not
    /// in that form.
    static func parse(_ text: String) -> [(String, String)] {
        var out: [(String, String)] = []
        var i = text.startIndex
        func skipSpaces() { while i < text.endIndex, text[i] == " " { i = text.index(after: i) } }
        skipSpaces()
        while i < text.endIndex {
            guard let eq = text[i...].firstIndex(of: "="), !text[i..<eq].contains(" "), eq > i else { return [] }
            let key = String(text[i..<eq])
            i = text.index(after: eq)
            var value = ""
            if i < text.endIndex, text[i] == "\"" {
                i = text.index(after: i)
                var closed = false
                while i < text.endIndex {
                    let c = text[i]
                    if c == "\\", text.index(after: i) < text.endIndex {
                        i = text.index(after: i)
                        value.append(text[i])
                    } else if c == "\"" {
                        closed = true
                        i = text.index(after: i)
                        break
                    } else {
                        value.append(c)
                    }
                    i = text.index(after: i)
                }
                guard closed else { return [] }
            } else {
                while i < text.endIndex, text[i] != " " {
                    value.append(text[i])
                    i = text.index(after: i)
                }
            }
            out.append((key, value))
            skipSpaces()
        }
        return out
    }
}
