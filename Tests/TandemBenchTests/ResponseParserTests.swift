import Testing
@testable import tandem_bench

/// The load generator counts a write as done from the status its parser reads, and keeps
/// the connection for the next request: a parser that misreads a boundary would count
/// wrong answers or hand the next request the tail of this one.
@Suite struct ResponseParserTests {
    /// Feeds `bytes` in pieces of `step` bytes (as reads would deliver them) and returns
    /// every answer parsed, in order, plus what was left unconsumed.
    func parseAll(_ bytes: [UInt8], step: Int, answers: Int, head: Bool = false) throws -> ([ResponseParser.Parsed], Int) {
        var parser = ResponseParser(maxHeaderBytes: 1024, maxBodyBytes: 1 << 20)
        var buffer: [UInt8] = []
        var start = 0
        var fed = 0
        var out: [ResponseParser.Parsed] = []
        parser.begin(bodyless: head)
        while out.count < answers {
            let s = try buffer.withUnsafeBufferPointer { try parser.consume($0, from: start) }
            start = s.next
            if let a = s.answer {
                out.append(a)
                parser.begin(bodyless: head)
                continue
            }
            guard fed < bytes.count else { break }
            let n = min(step, bytes.count - fed)
            buffer += bytes[fed..<(fed + n)]
            fed += n
        }
        return (out, buffer.count - start + (bytes.count - fed))
    }

    @Test func answersByLengthAndInChunksSplitAtEveryByte() throws {
        let text = "HTTP/1.1 200 OK\r\ncontent-LENGTH:  5 \r\nX-Other: a:b\r\n\r\nhello"
            + "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: Chunked\r\n\r\n3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n"
            + "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
            + "HTTP/1.1 409 Conflict\r\nContent-Length: 0\r\n\r\nHTTP/1.1"
        let bytes = Array(text.utf8)
        for step in [1, 2, 3, 7, 64, bytes.count] {
            let (answers, left) = try parseAll(bytes, step: step, answers: 4)
            #expect(answers == [
                .init(status: 200, body: Array("hello".utf8), close: false),
                .init(status: 201, body: Array("abc0123456789".utf8), close: false),
                .init(status: 204, body: [], close: true),
                .init(status: 409, body: [], close: false),
            ], "pieces of \(step) bytes")
            // The start of a fifth answer stays for the next call.
            #expect(left == 8, "pieces of \(step) bytes")
        }
    }

    @Test func anAnswerToHeadHasNoBodyWhateverItsLength() throws {
        let bytes = Array("HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".utf8)
        let (answers, left) = try parseAll(bytes, step: 5, answers: 2, head: true)
        #expect(answers.map(\.status) == [200, 200])
        #expect(answers.allSatisfy { $0.body.isEmpty })
        #expect(left == 0)
    }

    @Test func malformedOrOversizedAnswersAreRefusedWithTheReason() {
        let cases: [(String, String)] = [
            ("HTTP/2 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
            ("HTTP/1.1 2x0 OK\r\n\r\n", "not an HTTP/1.x status line"),
            ("HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
            ("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
            ("HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n", "bad Content-Length"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n", "chunk not followed by CRLF"),
            ("HTTP/1.1 200 OK\r\n\r\n", "without Content-Length or chunked"),
            ("HTTP/1.1 200 OK\r\nX: " + String(repeating: "a", count: 2000), "response header longer than 1024 bytes"),
        ]
        for (text, reason) in cases {
            do {
                _ = try parseAll(Array(text.utf8), step: 16, answers: 1)
                Issue.record("accepted: \(text.prefix(40))")
            } catch {
                #expect("\(error)".contains(reason), "\(text.prefix(40)): \(error)")
            }
        }
    }

    @Test func urlsAreSplitIntoConnectionAndRequestTarget() {
        #expect(KeepAliveClient.target("http://127.0.0.1:8080/v1/execute?x=1")
                == .init(key: "127.0.0.1:8080", host: "127.0.0.1", port: 8080, path: "/v1/execute?x=1"))
        #expect(KeepAliveClient.target("http://localhost:9")?.path == "/")
        #expect(KeepAliveClient.target("http://localhost:9?q")?.path == "/?q")
        #expect(KeepAliveClient.target("https://localhost:9/") == nil)
        #expect(KeepAliveClient.target("http://localhost/") == nil)
        #expect(KeepAliveClient.target("http://:80/") == nil)
        #expect(KeepAliveClient.target("http://h:99999/") == nil)
    }
}
