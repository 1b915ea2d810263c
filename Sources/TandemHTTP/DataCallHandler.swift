import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdCore
import NIOCore
import NIOHTTPTypes
import TandemTransport

/// Serves the data API (`/v1/...`) on the HTTP connection's event loop, ahead of
/// Hummingbird's router, which keeps the probes, /status and /metrics.
///
/// Why not a route: a routed call runs as a Swift task, so a write crossed four threads
/// (the event loop, a task, the site's loop, the task again, the event loop). Here the
/// call goes from the event loop to the site's loop and its answer comes straight back:
/// two hand-offs fewer per write (docs/PERFORMANCE.md has the figures). Which calls take
/// that way and which still run as a task is `DataAPI.handle`'s choice.
///
/// HTTP/1.1 answers in request order: while a call is under way, later requests wait
/// here (and reading stops); a data call that follows requests handed to the router
/// waits until their answers have gone out. Bounded: one call per connection at a time,
/// its body at most `maxBodyBytes` and within the site's budget (`DataAPI.reserve`), and
/// a body that stalls (no byte for `bodyIdleMilliseconds`) is answered 408 and closed.
final class DataCallHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    /// A data call being read.
    private struct Reading {
        var head: HTTPRequest
        var path: String
        var query: String
        var scope: Scope = .read
        var admitted = false
        var body: [UInt8] = []
        var held = 0
        /// Set when the call is refused before it is carried out; its answer.
        var refusal: APIError?
        /// The headers a call carries, looked up once while the head is checked (each
        /// lookup scans the fields and joins repeated values into a new string).
        var contentType = ""
        var forwarded: [ForwardedHeader] = []
    }

    private let api: DataAPI
    private let maxBodyBytes: Int
    private var reading: Reading?
    /// What was read, in order, waiting for the answers owed before it: request parts,
    /// and the end of the client's input or a parse error, which must not overtake them.
    private enum Inbound {
        case part(HTTPRequestPart)
        case inputClosed
        case error(any Error)
    }
    private var waiting = CircularBuffer<Inbound>()
    /// A data call is being carried out: its answer is owed.
    private var answering = false
    /// Whether the request being read goes to the router (true), is ours (false), or none.
    private var passing: Bool?
    /// Requests handed to the router whose answers have not ended yet.
    private var routerAnswersOwed = 0
    /// A read asked for while requests wait.
    private var readHeld = false
    /// The connection closes once the owed answer is out (Connection: close, a refused
    /// body left unread, or the server shutting down).
    private var closeAfterAnswer = false
    /// The answer refuses a body that is left unread: after it, the output is closed and
    /// what the client still sends is read and dropped for a while (a close with unread
    /// bytes resets the connection, and the client could lose the answer).
    private var lingerAfterAnswer = false
    private var lingering = false
    private var lingerTimer: Scheduled<Void>?
    private var lingeredBytes = 0
    static let lingerBytes = 4 << 20
    static let lingerTime = TimeAmount.seconds(2)
    /// No more data calls start on this connection: the router is closing it (graceful
    /// shutdown, or a request of its own with Connection: close).
    private var routerCloses = false
    private var closed = false
    /// Checks, every half idle time, whether the connection has been idle for the whole
    /// idle time (no request under way, nothing read from the client and no answer
    /// draining to it since): a client that keeps a connection open and does nothing
    /// more is let go.
    private var idleCheck: RepeatedTask?
    /// When a request part was last read, or an idle check last saw the answer going
    /// out move (a large document still reaching a slow client is not idle).
    private var lastActivity = NIODeadline.now()
    /// Bytes of answers waiting in the channel at the last idle check.
    private var bufferedAtLastCheck = 0
    /// Fires when a data call's body stalls: a client that sent a head and then nothing
    /// (or whose network dropped the flow without a FIN) must not hold its call slot and
    /// the bytes it reserved for good.
    private var bodyTimer: Scheduled<Void>?
    /// Inside a read from the socket (its completion follows and goes to the router).
    private var inRead = false
    private var draining = false

    init(api: DataAPI, maxBodyBytes: Int) {
        self.api = api
        self.maxBodyBytes = maxBodyBytes
    }

    /// Whether a request is a data call (the methods the API has, under /v1/).
    static func isDataCall(_ head: HTTPRequest) -> Bool {
        guard let path = head.path, path.hasPrefix("/v1/") else { return false }
        switch head.method {
        case .get, .post, .put, .delete, .patch: return true
        default: return false
        }
    }

    // MARK: Inbound

    func handlerAdded(context: ChannelHandlerContext) {
        let idle = TimeAmount.milliseconds(Int64(api.settings.idleConnectionMilliseconds))
        guard idle > .zero else { return }
        lastActivity = .now()
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        idleCheck = context.eventLoop.scheduleRepeatedTask(initialDelay: idle, delay: .nanoseconds(max(idle.nanoseconds / 2, 1))) { _ in
            let (handler, context) = bound.value
            handler.closeIfIdle(context: context, idle: idle)
        }
    }

    private func closeIfIdle(context: ChannelHandlerContext, idle: TimeAmount) {
        // An answer still draining counts as activity: what waits in the channel changed
        // since the last check. One that does not move for the whole idle time (a client
        // that reads nothing) does not keep the connection.
        let buffered = (try? context.channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0
        if buffered != bufferedAtLastCheck {
            bufferedAtLastCheck = buffered
            lastActivity = .now()
        }
        guard !closed, reading == nil, !answering, routerAnswersOwed == 0, waiting.isEmpty, passing == nil,
              NIODeadline.now() - lastActivity >= idle
        else { return }
        closeNow(context: context)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        lastActivity = .now()
        if lingering {
            if case let .body(chunk) = unwrapInboundIn(data) { lingeredBytes += chunk.readableBytes }
            if lingeredBytes > Self.lingerBytes { closeNow(context: context) }
            return
        }
        guard !closed else { return }
        waiting.append(.part(unwrapInboundIn(data)))
        inRead = true
        drain(context: context)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A request that cannot be parsed, behind a call whose answer is owed: the router
        // answers it (400, then close) only after that answer.
        guard answering || !waiting.isEmpty, !closed else { return context.fireErrorCaught(error) }
        waiting.append(.error(error))
        drain(context: context)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        inRead = false
        // A call whose body is still to come after this read: its stall timer starts (or
        // starts again). Armed here, once per read, rather than per call: a call whose
        // head and body came in one read, as most do, costs no timer at all.
        if reading != nil && !closed { armBodyTimer(context: context) }
        context.fireChannelReadComplete()
    }

    /// Takes the waiting parts in order for as long as no answer is owed ahead of them.
    private func drain(context: ChannelHandlerContext) {
        // An answer given while taking a part (a refusal) lands here again: the loop below
        // goes on by itself.
        guard !draining else { return }
        draining = true
        defer { draining = false }
        var passed = false
        while !closed, let next = waiting.first {
            if answering { break }
            switch next {
            case let .part(part):
                if case let .head(h) = part, Self.isDataCall(h) {
                    if routerCloses {
                        // The router closes the connection after its answer: a call
                        // started now would lose its answer. Not started.
                        waiting.removeAll()
                        continue
                    }
                    if routerAnswersOwed > 0 { return finishDrain(context: context, passed: passed) }
                }
                waiting.removeFirst()
                passed = take(part, context: context) || passed
            case .inputClosed:
                waiting.removeFirst()
                if passed && !inRead { context.fireChannelReadComplete() }
                passed = false
                context.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
            case let .error(error):
                waiting.removeFirst()
                if passed && !inRead { context.fireChannelReadComplete() }
                passed = false
                context.fireErrorCaught(error)
            }
        }
        finishDrain(context: context, passed: passed)
    }

    private func finishDrain(context: ChannelHandlerContext, passed: Bool) {
        // The router's side takes what it was given when a read completes.
        if passed && !inRead { context.fireChannelReadComplete() }
        if readHeld && waiting.isEmpty && !closed {
            readHeld = false
            context.read()
        }
    }

    /// Takes one part; true when it went to the router.
    private func take(_ part: HTTPRequestPart, context: ChannelHandlerContext) -> Bool {
        switch part {
        case let .head(head):
            if Self.isDataCall(head) {
                passing = false
                begin(head, context: context)
                return false
            }
            passing = true
            routerAnswersOwed += 1
            // Exactly Hummingbird's own test for closing after its answer.
            if head.headerFields[.connection] == "close" { routerCloses = true }
        case var .body(chunk):
            if passing == true { break }
            guard var r = reading else { return false }
            reading = nil
            if r.refusal == nil {
                if r.body.count + chunk.readableBytes > maxBodyBytes {
                    r.refusal = Self.tooLarge(maxBodyBytes)
                } else {
                    do throws(APIError) {
                        try api.reserve(bytes: chunk.readableBytes)
                        r.held += chunk.readableBytes
                        r.body.append(contentsOf: chunk.readBytes(length: chunk.readableBytes) ?? [])
                    } catch {
                        r.refusal = error
                    }
                }
                // The rest of a refused body is not read: answer now, then close.
                if let refusal = r.refusal {
                    closeAfterAnswer = true
                    lingerAfterAnswer = true
                    answer(refusal.answer, releasing: r, context: context)
                    return false
                }
            }
            reading = r
            return false
        case .end:
            if passing == true {
                passing = nil
                break
            }
            passing = nil
            cancelBodyTimer()
            guard let r = reading else { return false }
            reading = nil
            if let refusal = r.refusal {
                answer(refusal.answer, releasing: r, context: context)
            } else {
                carryOut(r, context: context)
            }
            return false
        }
        context.fireChannelRead(wrapInboundOut(part))
        return true
    }

    /// Starts reading a data call: who asks, whether the site takes it, its headers.
    private func begin(_ head: HTTPRequest, context: ChannelHandlerContext) {
        var target = Substring(head.path ?? "/")
        if let hash = target.firstIndex(of: "#") { target = target[..<hash] }
        let path: String, query: String
        if let q = target.firstIndex(of: "?") {
            path = String(target[..<q])
            query = String(target[target.index(after: q)...])
        } else {
            path = String(target)
            query = ""
        }
        var r = Reading(head: head, path: path, query: query)
        if Self.asksToClose(head) { closeAfterAnswer = true }
        do throws(APIError) {
            r.scope = try api.authenticate(authorization: head.headerFields[.authorization])
            try api.admitCall()
            r.admitted = true
            // Within what a forwarded call may carry between sites (docs/WIRE.md).
            guard path.utf8.count <= 4096, query.utf8.count <= 8192 else {
                throw APIError(status: 414, code: "uri_too_long", message: "the path may have 4096 bytes and the query 8192")
            }
            r.contentType = head.headerFields[.contentType] ?? ""
            guard r.contentType.utf8.count <= 256 else {
                throw APIError.badRequest("bad_header", "Content-Type is longer than 256 bytes")
            }
            for field in Self.forwardedHeaders {
                guard let v = head.headerFields[field] else { continue }
                guard v.utf8.count <= 1024 else {
                    throw APIError(status: 431, code: "header_too_large", message: "\(field.rawName) is longer than 1024 bytes")
                }
                r.forwarded.append(ForwardedHeader(name: field.rawName, value: v))
            }
            if let length = head.headerFields[.contentLength].flatMap({ Int($0) }), length > maxBodyBytes {
                throw Self.tooLarge(maxBodyBytes)
            }
        } catch {
            r.refusal = error
            if error.status == 413 {
                // A body too large to read is not read: answer now, then close.
                closeAfterAnswer = true
                lingerAfterAnswer = true
                answer(error.answer, releasing: r, context: context)
                return
            }
            // Refused: the slot is not held while the body is read and dropped.
            if r.admitted { api.releaseCall(bytes: r.held) }
            r.admitted = false
            r.held = 0
        }
        reading = r
        // Begun outside a read (it waited behind an answer): no read completion follows
        // to start its stall timer, so it starts here.
        if !inRead { armBodyTimer(context: context) }
    }

    /// (Re)starts the stalled-body timer of the call being read.
    private func armBodyTimer(context: ChannelHandlerContext) {
        bodyTimer?.cancel()
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        bodyTimer = context.eventLoop.scheduleTask(in: .milliseconds(Int64(api.settings.bodyIdleMilliseconds))) {
            let (handler, context) = bound.value
            handler.bodyStalled(context: context)
        }
    }

    private func cancelBodyTimer() {
        bodyTimer?.cancel()
        bodyTimer = nil
    }

    private func cancelIdleCheck() {
        idleCheck?.cancel()
        idleCheck = nil
    }

    private func bodyStalled(context: ChannelHandlerContext) {
        bodyTimer = nil
        guard let r = reading, !closed else { return }
        reading = nil
        closeAfterAnswer = true
        answer(APIError(status: 408, code: "request_timeout", message: "no bytes of the request body came for \(api.settings.bodyIdleMilliseconds) ms").answer,
               releasing: r, context: context)
    }

    /// Whether a request's Connection header holds the close option.
    static func asksToClose(_ head: HTTPRequest) -> Bool {
        head.headerFields[values: .connection].contains { value in
            value.split(separator: ",").contains { $0.trimmingCharacters(in: .whitespaces).lowercased() == "close" }
        }
    }

    /// Application headers a call carries to the primary.
    static let forwardedHeaders = ["Tandem-Patient", "Tandem-Document-Kind", "Tandem-Appointment", "Tandem-SHA256"].compactMap { HTTPField.Name($0) }

    static func tooLarge(_ limit: Int) -> APIError {
        APIError(status: 413, code: "too_large", message: "the request body exceeds the limit of \(limit) bytes")
    }

    private func carryOut(_ r: Reading, context: ChannelHandlerContext) {
        // Checked and collected when the head was read (`begin`): a call is carried out only
        // when nothing refused it there.
        let call = ForwardedCall(method: r.head.method.rawValue, path: r.path, query: r.query,
                                 contentType: r.contentType, headers: r.forwarded, body: r.body,
                                 deadlineMilliseconds: api.settings.waitForPrimaryMilliseconds)
        answering = true
        let loop = context.eventLoop
        let bound = NIOLoopBound((self, context), eventLoop: loop)
        // What the answer gives back (the slot and the bytes), without the body.
        var owed = r
        owed.body = []
        let released = owed
        api.handle(call, scope: r.scope, answerOn: { loop.execute($0) }) { answer in
            let (handler, context) = bound.value
            handler.answer(answer, releasing: released, context: context)
        }
    }

    // MARK: Outbound

    /// Writes an answer, gives the call's slot and bytes back, and takes what waits.
    private func answer(_ a: ForwardedAnswer, releasing r: Reading, context: ChannelHandlerContext) {
        if r.admitted { api.releaseCall(bytes: r.held) }
        if reading == nil { cancelBodyTimer() }
        answering = false
        guard !closed else { return }
        var fields = HTTPFields()
        for h in a.headers {
            if let name = HTTPField.Name(h.name) { fields[name] = h.value }
        }
        fields[.cacheControl] = "no-store"
        fields[.contentLength] = String(a.body.count)
        fields[.server] = "tandemd"
        fields[.date] = Self.httpDate()
        if closeAfterAnswer { fields[.connection] = "close" }
        // A status from a peer's answer outside HTTP's range must not reach the precondition.
        let code = (100...599).contains(Int(a.status)) ? Int(a.status) : 502
        context.write(wrapOutboundOut(.head(HTTPResponse(status: .init(code: code), headerFields: fields))), promise: nil)
        if !a.body.isEmpty { context.write(wrapOutboundOut(.body(context.channel.allocator.buffer(bytes: a.body))), promise: nil) }
        if closeAfterAnswer {
            // Closed once the answer is written, not before: a large one may still be queued.
            let written = context.eventLoop.makePromise(of: Void.self)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: written)
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            let linger = lingerAfterAnswer
            written.futureResult.whenComplete { _ in
                let (handler, context) = bound.value
                if linger { handler.linger(context: context) } else { handler.closeNow(context: context) }
            }
            closed = true
            waiting.removeAll()
            return
        }
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        drain(context: context)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        // The router's answers pass here on their way out.
        if case .end = unwrapOutboundIn(data) {
            routerAnswersOwed = max(0, routerAnswersOwed - 1)
            context.write(data, promise: promise)
            if routerAnswersOwed == 0 { drain(context: context) }
            return
        }
        context.write(data, promise: promise)
    }

    func read(context: ChannelHandlerContext) {
        // Back-pressure: nothing more is read while requests wait (a client that pipelines
        // gets at most one read ahead). Not while a call is merely under way: stopping and
        // restarting the socket's reads for every call costs two epoll_ctl calls.
        if !waiting.isEmpty {
            readHeld = true
            return
        }
        context.read()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ChannelShouldQuiesceEvent {
            if answering || reading != nil {
                // The router's handlers would close at once: they do not know this call.
                // It is answered, then the connection closes.
                closeAfterAnswer = true
                return
            }
            routerCloses = true
        }
        if let e = event as? ChannelEvent, e == .inputClosed {
            if lingering { return closeNow(context: context) }
            if (answering || !waiting.isEmpty) && !closed {
                // The client sent all it will: what it sent before is answered first.
                waiting.append(.inputClosed)
                return drain(context: context)
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        cancelBodyTimer()
        cancelIdleCheck()
        if let r = reading, r.admitted { api.releaseCall(bytes: r.held) }
        reading = nil
        waiting.removeAll()
        context.fireChannelInactive()
    }

    /// After an answer that refused an unread body: the output is closed, what still
    /// comes is dropped (at most `lingerBytes`, for at most `lingerTime`), then the close.
    private func linger(context: ChannelHandlerContext) {
        lingering = true
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let outputClosed = context.eventLoop.makePromise(of: Void.self)
        context.close(mode: .output, promise: outputClosed)
        outputClosed.futureResult.whenFailure { _ in
            let (handler, context) = bound.value
            handler.closeNow(context: context)
        }
        lingerTimer = context.eventLoop.scheduleTask(in: Self.lingerTime) {
            let (handler, context) = bound.value
            handler.closeNow(context: context)
        }
        context.read()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        cancelIdleCheck()
        if let r = reading, r.admitted { api.releaseCall(bytes: r.held) }
        reading = nil
    }

    private func closeNow(context: ChannelHandlerContext) {
        cancelBodyTimer()
        cancelIdleCheck()
        if let r = reading, r.admitted { api.releaseCall(bytes: r.held) }
        reading = nil
        closed = true
        lingering = false
        lingerTimer?.cancel()
        lingerTimer = nil
        waiting.removeAll()
        guard context.channel.isActive else { return }
        context.close(promise: nil)
    }

    /// The Date header (RFC 9110 §6.6.1), e.g. "Mon, 30 Nov 2026 04:23:31 GMT".
    static func httpDate() -> String {
        var t = time(nil)
        var parts = tm()
        gmtime_r(&t, &parts)
        var buffer = [CChar](repeating: 0, count: 40)
        let n = strftime(&buffer, buffer.count, "%a, %d %b %Y %H:%M:%S GMT", &parts)
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// The HTTP server of a site: Hummingbird's HTTP/1.1 with the data API served ahead of
/// the router (`DataCallHandler`) when `api` is given.
public func siteHTTPServer(api: DataAPI?) -> HTTPServerBuilder {
    guard let api else { return .http1() }
    let limit = api.settings.maxBodyBytes
    return .http1(configuration: .init(additionalChannelHandlers: [DataCallHandler(api: api, maxBodyBytes: limit)]))
}
