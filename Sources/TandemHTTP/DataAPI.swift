import Foundation
import Synchronization
import TandemCore
import TandemModel
import TandemNode
import TandemStore
import TandemTransport

/// An answer that is an error: its HTTP status and a stable code, sent as
/// `{"error":{"code":"...","message":"..."}}`.
public struct APIError: Error, Sendable, CustomStringConvertible {
    public var status: UInt16
    public var code: String
    public var message: String
    /// Seconds, for 503: when to try again.
    public var retryAfter: Int?

    public var description: String { "\(status) \(code): \(message)" }

    static func badRequest(_ code: String, _ message: String) -> APIError { APIError(status: 400, code: code, message: message) }
    static func notFound(_ message: String) -> APIError { APIError(status: 404, code: "not_found", message: message) }
    static func conflict(_ code: String, _ message: String) -> APIError { APIError(status: 409, code: code, message: message) }
    /// This site is not (or no longer) the primary: the call was not carried out and may
    /// be sent to the primary. 421 Misdirected Request, between sites only.
    static func misdirected(_ message: String) -> APIError { APIError(status: 421, code: "not_primary", message: message) }
    static func unavailable(_ code: String, _ message: String, retryAfter: Int? = 1) -> APIError {
        APIError(status: 503, code: code, message: message, retryAfter: retryAfter)
    }

    var answer: ForwardedAnswer {
        let body: [String: Any] = ["error": ["code": code, "message": message]]
        var headers = [ForwardedHeader(name: "Content-Type", value: "application/json")]
        if let retryAfter { headers.append(ForwardedHeader(name: "Retry-After", value: String(retryAfter))) }
        return ForwardedAnswer(status: status, headers: headers, body: encodeJSON(body))
    }

    /// The answer for a store error: the status that fits it.
    static func store(_ e: StoreError) -> APIError {
        switch e.code {
        case "constraint": return APIError(status: 409, code: "constraint", message: e.description)
        case "precondition_failed": return APIError(status: 409, code: "precondition_failed", message: e.description)
        case "too_large": return APIError(status: 413, code: "too_large", message: e.description)
        case "disk_full": return APIError(status: 507, code: "disk_full", message: e.description)
        case "refused": return APIError(status: 400, code: "refused", message: e.description)
        case "sql_error", "no_primary_key", "statement_timeout": return APIError(status: 400, code: e.code, message: e.description)
        default: return APIError(status: 500, code: e.code, message: e.description)
        }
    }
}

/// An answer as JSON text, keys sorted. The answers are built of dictionaries, arrays,
/// strings, integers, doubles, booleans and NSNull; `JSONWriter` writes those directly
/// (JSONSerialization bridged each to an Objective-C object first: a twentieth of a
/// primary's CPU per write). Anything else goes through JSONSerialization.
func encodeJSON(_ object: Any) -> [UInt8] {
    var writer = JSONWriter()
    if writer.write(object) { return writer.bytes }
    guard JSONSerialization.isValidJSONObject(object),
          let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes])
    else { return Array(#"{"error":{"code":"internal","message":"answer not encodable"}}"#.utf8) }
    return [UInt8](data)
}

/// An executed write's answer through the generic writer: what `JSONWriter.execution`
/// must equal byte for byte (tests).
func executionAnswerThroughAny(_ e: Execution) -> [UInt8] {
    let results: [[String: Any]] = e.results.map { r in
        var o: [String: Any] = ["rows_affected": r.rowsAffected, "last_insert_rowid": r.lastInsertRowID]
        if !r.columns.isEmpty { o["columns"] = r.columns; o["rows"] = r.rows.map { $0.map(\.json) } }
        return o
    }
    return encodeJSON(["results": results, "lsn": e.record.lsn.rawValue] as [String: Any])
}

/// Settings of the data API.
public struct DataAPISettings: Sendable {
    public var site: SiteID
    /// How long a call waits for a primary (during an election) before 503: a little
    /// longer than a failover, so clients see a pause, not an error.
    public var waitForPrimaryMilliseconds: UInt32 = 6_000
    /// How long a `min_lsn` read (or a primary's read of uncommitted records) may wait.
    public var readWaitMilliseconds: UInt32 = 5_000
    /// Largest request body.
    public var maxBodyBytes = 20 << 20
    /// Largest document.
    public var maxDocumentBytes = 16 << 20
    /// Switchover: how long to wait for the new primary.
    public var switchoverWaitMilliseconds: UInt32 = 10_000
    /// Calls in progress at once on this site, at most (beyond: 503 overloaded).
    public var maxCallsInFlight = 512
    /// Request bytes held at once by calls in progress, at most.
    public var maxBytesInFlight = 256 << 20
    /// A data call whose body sends no bytes for this long is answered 408 and its
    /// connection closed, giving back its call slot and reserved bytes.
    public var bodyIdleMilliseconds: UInt32 = 30_000
    /// A connection with no request under way and no byte from its client for this long
    /// is closed (0: never), so clients that keep connections open and idle cannot pile up.
    public var idleConnectionMilliseconds: UInt32 = 120_000
    /// Largest answer body a forwarded call may send back (at most 30 MiB, under the
    /// 32 MiB frame); tests lower it.
    public var maxForwardedAnswerBytes = 30 << 20

    public init(site: SiteID) { self.site = site }
}

/// The data API of one site: every site accepts every call; writes and linearizable reads
/// are carried out by the primary, reached over the peer TLS link when it is elsewhere.
public final class DataAPI: Sendable {
    /// Calls and request bytes in progress (the memory the API may hold is bounded).
    let inFlight = Mutex<(calls: Int, bytes: Int)>((0, 0))
    /// State hashes asked and not yet answered (one computed at a time, the rest waiting).
    let stateHashesWaiting = Mutex(0)
    /// At most this many state hashes computing or waiting; more are refused (each reads
    /// every row).
    static let maxStateHashesWaiting = 4
    public let runtime: SiteRuntime
    public let settings: DataAPISettings
    public let tokens: TokenStore
    public let metrics: SiteMetrics

    public init(runtime: SiteRuntime, settings: DataAPISettings, tokens: TokenStore, metrics: SiteMetrics = SiteMetrics()) {
        self.runtime = runtime
        self.settings = settings
        self.tokens = tokens
        self.metrics = metrics
        runtime.setForwardHandler { [weak self] peer, call, reply in
            guard let self else { return reply(APIError.unavailable("stopping", "the site is stopping").answer) }
            let scope = call.header("Tandem-Scope").flatMap { Scope(name: $0) } ?? .read
            self.metrics.forwardedIn()
            // The answer is sent from whichever thread has it (the site's loop, for a write).
            self.handle(call, scope: scope, forwardedFrom: peer, answerOn: { $0() }) { answer in
                // The answer travels in one frame: one too large is replaced rather than sent
                // as a frame the peer would refuse (closing the replication link).
                let limit = min(self.settings.maxForwardedAnswerBytes, Self.maxForwardedAnswerBytes)
                if answer.body.count > limit {
                    return reply(Self.tooLargeToForward(answer, limit: limit, writeRoute: (try? Route(call))?.isWrite ?? true))
                }
                reply(answer)
            }
        }
    }

    /// Largest answer body forwarded between sites (under the 32 MiB frame limit).
    static let maxForwardedAnswerBytes = 30 << 20

    /// What goes back in place of an answer too large for a frame. A write that was
    /// carried out must not be reported as refused (its client would send it again): it
    /// keeps its status and headers (`Tandem-LSN`), and its body says the write committed
    /// and its rows were left out. Anything else was not carried out as far as the
    /// client is concerned (a read): 413, ask the primary or narrow it.
    static func tooLargeToForward(_ answer: ForwardedAnswer, limit: Int, writeRoute: Bool) -> ForwardedAnswer {
        let why = "the answer has \(answer.body.count) bytes, more than \(limit) can be forwarded between sites"
        guard writeRoute, (200..<300).contains(answer.status) else {
            return APIError(status: 413, code: "too_large", message: why + "; ask the primary directly or narrow the query").answer
        }
        let body = encodeJSON(["committed": true,
                               "answer_omitted": why + ": the write committed (its LSN is in the Tandem-LSN header); read what it returned from the primary"])
        return ForwardedAnswer(status: answer.status, headers: answer.headers.filter { $0.name.lowercased() != "content-length" }, body: body)
    }

    /// Takes a slot for a call (503 when too many are in progress); `release` gives it back.
    public func admitCall() throws(APIError) {
        let ok = inFlight.withLock { f -> Bool in
            guard f.calls < settings.maxCallsInFlight else { return false }
            f.calls += 1
            return true
        }
        guard ok else { throw APIError.unavailable("overloaded", "more than \(settings.maxCallsInFlight) calls are in progress on this site") }
    }

    public func releaseCall(bytes: Int) { inFlight.withLock { $0.calls -= 1; $0.bytes -= bytes } }

    /// Reserves `n` more request bytes for a call in progress.
    public func reserve(bytes n: Int) throws(APIError) {
        let ok = inFlight.withLock { f -> Bool in
            guard f.bytes + n <= settings.maxBytesInFlight else { return false }
            f.bytes += n
            return true
        }
        guard ok else { throw APIError.unavailable("overloaded", "request bodies in progress exceed \(settings.maxBytesInFlight) bytes on this site") }
    }

    /// Authenticates a call from a client: the scope its bearer token grants.
    public func authenticate(authorization: String?) throws(APIError) -> Scope {
        guard tokens.isConfigured else {
            throw APIError(status: 401, code: "unauthorized", message: "this site has no API token file (api.token_file); the data API is closed")
        }
        guard let authorization, authorization.hasPrefix("Bearer ") else {
            throw APIError(status: 401, code: "unauthorized", message: "an Authorization: Bearer token is required")
        }
        // Spaces and tabs around the token are dropped (Foundation's trimming, bridged per
        // request, cost more than the token's SHA-256).
        var token = authorization.utf8.dropFirst("Bearer ".utf8.count)
        while let c = token.first, c == 0x20 || c == 0x09 { token = token.dropFirst() }
        while let c = token.last, c == 0x20 || c == 0x09 { token = token.dropLast() }
        guard let entry = tokens.entry(forToken: String(decoding: token, as: UTF8.self)) else {
            throw APIError(status: 401, code: "unauthorized", message: "the bearer token is not known to this site")
        }
        return entry.scope
    }

    /// Carries out one call. `forwardedFrom`: the site that forwarded it (then this site
    /// answers 421 rather than forward again if it is not the primary).
    /// `receivedAt`: when the call arrived (the wait for a primary counts from then).
    public func handle(_ call: ForwardedCall, scope: Scope, forwardedFrom: SiteID? = nil, receivedAt: UInt64? = nil) async -> ForwardedAnswer {
        do throws(APIError) {
            let route = try Route(call)
            guard scope >= route.scope else {
                throw APIError(status: 403, code: "forbidden", message: "this call needs a token with scope \(route.scope); yours has \(scope)")
            }
            if try !route.needsPrimary(call) || forwardedFrom != nil { return try await local(route, call) }
            return try await viaPrimary(route, call, scope: scope, since: receivedAt ?? SiteRuntime.now)
        } catch {
            return error.answer
        }
    }

    /// Carries out a call and hands its answer to `completion`, which runs through
    /// `answerOn` (for a client's call the connection's event loop; for a forwarded call
    /// whichever thread has the outcome). A write or a query this site serves itself (a
    /// write or linearizable read on the primary, a local read anywhere), and on a replica
    /// a write or linearizable read for the live primary, go straight to the site's loop
    /// or the peer link and their outcome straight back, with no Swift task between: two
    /// thread hand-offs fewer per call. Other calls, large bodies and answers with many
    /// rows take a task.
    public func handle(_ call: ForwardedCall, scope: Scope, forwardedFrom: SiteID? = nil,
                       answerOn: @escaping @Sendable (@escaping @Sendable () -> Void) -> Void,
                       completion: @escaping @Sendable (ForwardedAnswer) -> Void) {
        let received = SiteRuntime.now
        /// Runs `call` the general way, as a task (its wait for a primary counted from
        /// when the call arrived).
        @Sendable func asTask() {
            Task {
                let answer = await self.handle(call, scope: scope, forwardedFrom: forwardedFrom, receivedAt: received)
                answerOn { completion(answer) }
            }
        }
        /// Answers from the outcome; a 421 (this site stopped being the primary: nothing
        /// was carried out) goes the general way, which waits for the next primary (for a
        /// forwarded call, the site that forwarded it does that).
        @Sendable func finish(_ answer: () throws(APIError) -> ForwardedAnswer) {
            do throws(APIError) { completion(try answer()) } catch where error.status == 421 && forwardedFrom == nil { asTask() } catch {
                completion(error.answer)
            }
        }
        /// Builds the answer on `answerOn` when it is small; one with many rows is encoded
        /// in a task (megabytes of JSON would hold the event loop, or the site's loop).
        @Sendable func deliver(rows: Int, _ build: @escaping @Sendable () throws(APIError) -> ForwardedAnswer) {
            guard rows > Self.maxInlineRows else { return answerOn { finish(build) } }
            Task {
                let answer: ForwardedAnswer
                do throws(APIError) { answer = try build() } catch { answer = error.answer }
                answerOn { completion(answer) }
            }
        }
        // Large bodies are parsed in a task: the event loop also answers the probes, and a
        // forwarded call is parsed on the peer link's thread, which also carries the acks.
        let inlineBody = forwardedFrom == nil ? Self.maxInlineBody : Self.maxInlineForwardedBody
        guard call.body.count <= inlineBody, let route = try? Route(call), scope >= route.scope else { return asTask() }
        let status = runtime.status
        // A failed site answers through the general path (503 site_failed).
        let primary = status.role == .primary && !status.failed
        switch route {
        case .execute where primary:
            let batch: WriteBatch
            do throws(APIError) { batch = try executeBatch(call) } catch {
                let answer = error.answer
                return answerOn { completion(answer) }
            }
            let start = SiteRuntime.now
            runtime.write(batch) { result in
                // On the site's loop: the answer is built elsewhere (see deliver).
                let rows = (try? result.get())?.results.reduce(0) { $0 + $1.rows.count } ?? 0
                deliver(rows: rows) { () throws(APIError) in self.executeAnswer(try self.writeOutcome(result, start: start)) }
            }
        case .query:
            // A body that does not parse is answered the general way (400).
            guard let needsPrimary = try? route.needsPrimary(call) else { return asTask() }
            guard primary || forwardedFrom != nil || !needsPrimary else { return forwardToPrimary() }
            let request: ReadRequest
            do throws(APIError) { request = try queryRequest(call) } catch {
                let answer = error.answer
                return answerOn { completion(answer) }
            }
            runtime.read(request) { result in
                let rows = (try? result.get())?.rows.count ?? 0
                deliver(rows: rows) { () throws(APIError) in self.queryAnswer(try self.readOutcome(result), consistency: request.consistency) }
            }
        case .execute:
            forwardToPrimary()
        default:
            asTask()
        }

        /// A call for the primary, received here: sent to it over the peer link, its answer
        /// straight back. Anything but an answer (no live primary known, a 421, a lost
        /// link) goes the general way, which waits for the next one.
        func forwardToPrimary() {
            guard forwardedFrom == nil, !status.failed, let p = status.primary, p != settings.site, runtime.heardWithinLease(p) else {
                return asTask()
            }
            let deadline = received + UInt64(settings.waitForPrimaryMilliseconds) * 1_000_000
            metrics.forwardedOut()
            runtime.forward(forwardRequest(call, scope: scope, deadline: deadline), to: p) { result in
                answerOn {
                    switch self.forwardOutcome(result, route: route, primary: p) {
                    case let .success(answer?): completion(answer)
                    case .success(nil): asTask()
                    case let .failure(error): completion(error.answer)
                    }
                }
            }
        }
    }

    /// A call as it is forwarded to the primary: its deadline, the caller's scope, and the
    /// site the client used (bookings record it), whichever site executes.
    func forwardRequest(_ call: ForwardedCall, scope: Scope, deadline: UInt64) -> ForwardedCall {
        var forwarded = call
        forwarded.deadlineMilliseconds = UInt32(max(1_000, (deadline - min(deadline, SiteRuntime.now)) / 1_000_000 + 1_000))
        forwarded.headers.append(ForwardedHeader(name: "Tandem-Scope", value: scope.description))
        forwarded.headers.append(ForwardedHeader(name: "Tandem-Received-By", value: settings.site.name))
        return forwarded
    }

    /// What a forwarded call's outcome means: its answer; nil when it was not carried
    /// out (try again); or an error (a write sent but unanswered may have committed:
    /// retrying could apply it twice).
    func forwardOutcome(_ result: Result<ForwardedAnswer, ForwardError>, route: Route, primary p: SiteID) -> Result<ForwardedAnswer?, APIError> {
        switch result {
        case let .success(answer) where answer.status != 421:
            var a = answer
            a.headers.append(ForwardedHeader(name: "Tandem-Served-By", value: p.name))
            return .success(a)
        case .success, .failure(.notConnected), .failure(.noPrimary):
            return .success(nil)
        case .failure(.timedOut) where route.isWrite:
            return .failure(APIError(status: 503, code: "outcome_unknown",
                                     message: "the primary \(p) did not answer in time; the write may or may not have committed: read it back before retrying",
                                     retryAfter: nil))
        case .failure(.timedOut):
            return .success(nil)
        case let .failure(e):
            return .failure(APIError.unavailable("overloaded", "\(e)"))
        }
    }

    /// Largest body a call may have to be parsed on the connection's event loop.
    static let maxInlineBody = 64 << 10
    /// Largest body a forwarded call may have to be parsed on the peer link's thread.
    static let maxInlineForwardedBody = 8 << 10
    /// Most rows an answer may have to be encoded where the outcome arrives.
    static let maxInlineRows = 256

    /// Runs a call that needs the primary: here if this site is primary, otherwise on the
    /// primary over the peer link; while there is none it heard within a lease, waits up
    /// to the deadline (PROTOCOL L6).
    func viaPrimary(_ route: Route, _ call: ForwardedCall, scope: Scope, since start: UInt64) async throws(APIError) -> ForwardedAnswer {
        let deadline = start + UInt64(settings.waitForPrimaryMilliseconds) * 1_000_000
        var waited = false
        defer { if waited { metrics.waitedForPrimary(nanoseconds: SiteRuntime.now - start) } }
        while true {
            let s = runtime.status
            if s.failed { throw APIError(status: 503, code: "site_failed", message: "this site stopped after a storage error", retryAfter: nil) }
            if s.role == .primary {
                do { return try await local(route, call) } catch {
                    guard error.status == 421 else { throw error }
                }
            } else if let p = s.primary, p != settings.site, runtime.heardWithinLease(p) {
                // (A primary silent for a lease is not sent the call: it would hang there
                // and end as "outcome unknown"; waiting here for the next one is cleaner.)
                metrics.forwardedOut()
                // A switchover waits on the primary for up to its own limit: the forward
                // must outlast it, or a switchover that happened is reported as unknown.
                var forwardDeadline = deadline
                if case .switchover = route { forwardDeadline = max(deadline, SiteRuntime.now + UInt64(settings.switchoverWaitMilliseconds) * 1_000_000) }
                switch forwardOutcome(await runtime.forward(forwardRequest(call, scope: scope, deadline: forwardDeadline), to: p), route: route, primary: p) {
                case let .success(answer?): return answer
                case .success(nil): break  // not carried out: try again
                case let .failure(error): throw error
                }
            }
            if SiteRuntime.now >= deadline {
                throw APIError.unavailable("no_primary", "no primary could take the call within \(settings.waitForPrimaryMilliseconds) ms (an election, or this site is cut off from the majority)")
            }
            waited = true
            try? await Task.sleep(nanoseconds: 25_000_000)
        }
    }

    // MARK: Carrying out calls on this site

    func local(_ route: Route, _ call: ForwardedCall) async throws(APIError) -> ForwardedAnswer {
        switch route {
        case .execute: return try await execute(call)
        case .query: return try await query(call)
        case .bookAppointment: return try await bookAppointment(call)
        case .listAppointments: return try await listAppointments(call)
        case let .cancelAppointment(id): return try await cancelAppointment(id)
        case let .rescheduleAppointment(id): return try await rescheduleAppointment(id, call)
        case .uploadDocument: return try await uploadDocument(call)
        case let .document(id): return try await document(id, call)
        case .listDocuments: return try await listDocuments(call)
        case .exportAppointments: return try await exportAppointments(call)
        case .stateHash: return try await stateHash()
        case .switchover: return try await switchover(call)
        }
    }

    /// Runs a write batch on this site, which must be the primary.
    func write(_ batch: WriteBatch) async throws(APIError) -> Execution {
        let start = SiteRuntime.now
        let r: Result<Execution, WriteError>
        do { r = .success(try await runtime.write(batch)) } catch { r = .failure(error) }
        return try writeOutcome(r, start: start)
    }

    /// A write's outcome as the API reports it (metrics counted).
    func writeOutcome(_ r: Result<Execution, WriteError>, start: UInt64) throws(APIError) -> Execution {
        switch r {
        case let .success(e):
            metrics.committed(nanoseconds: SiteRuntime.now - start)
            return e
        case let .failure(error):
            switch error {
            case .notPrimary: throw APIError.misdirected("this site is not the primary")
            case let .refused(p):
                switch p {
                case .notPrimary, .noLease, .switchoverInProgress, .tooManyUncommitted:
                    throw APIError.misdirected("the primary cannot take writes now: \(p)")
                case .replicasTooFarBehind:
                    throw APIError.unavailable("replicas_behind", "\(p)")
                }
            case let .store(e): throw APIError.store(e)
            case let .notCommitted(why):
                // Certainly not applied: the call may go to the new primary.
                throw APIError.misdirected("the primary stepped down and the write did not commit (\(why))")
            case let .outcomeUnknown(why):
                throw APIError(status: 503, code: "outcome_unknown",
                               message: "\(why); the write may or may not have committed: read it back before retrying", retryAfter: nil)
            case .stopped: throw APIError.unavailable("stopping", "the site is stopping")
            }
        }
    }

    /// Runs a read; `linearizable` here means this site is the primary under its lease.
    func read(_ statement: SQLStatement, consistency: ReadConsistency, minLSN: LSN, waitMilliseconds: UInt32? = nil) async throws(APIError) -> QueryResult {
        try await read(readRequest(statement, consistency: consistency, minLSN: minLSN, waitMilliseconds: waitMilliseconds))
    }

    func read(_ request: ReadRequest) async throws(APIError) -> QueryResult {
        let r: Result<QueryResult, ReadError>
        do { r = .success(try await runtime.read(request)) } catch { r = .failure(error) }
        return try readOutcome(r)
    }

    func readRequest(_ statement: SQLStatement, consistency: ReadConsistency, minLSN: LSN, waitMilliseconds: UInt32?) -> ReadRequest {
        let wait = UInt64(waitMilliseconds ?? settings.readWaitMilliseconds)
        return ReadRequest(statement: statement, consistency: consistency, minLSN: minLSN, deadline: SiteRuntime.now + wait * 1_000_000)
    }

    /// A read's outcome as the API reports it.
    func readOutcome(_ r: Result<QueryResult, ReadError>) throws(APIError) -> QueryResult {
        switch r {
        case let .success(q): return q
        case let .failure(error):
            switch error {
            case .notPrimary: throw APIError.misdirected("this site is not the primary under a valid lease")
            case .timedOut: throw APIError.unavailable("lsn_not_reached", error.description)
            case .tooManyWaiting: throw APIError.unavailable("overloaded", error.description)
            case let .store(e): throw APIError.store(e)
            case .stopped: throw APIError.unavailable("stopping", error.description)
            }
        }
    }

    /// Headers every data answer carries: the LSN it reflects, and whether it may be
    /// stale (a site that follows no live primary answers `local` reads from what it has).
    func dataHeaders(lsn: LSN, consistency: ReadConsistency? = nil) -> [ForwardedHeader] {
        var h = [ForwardedHeader(name: "Content-Type", value: "application/json"), ForwardedHeader(name: "Tandem-LSN", value: String(lsn.rawValue))]
        if consistency == .local, isStale { h.append(ForwardedHeader(name: "Tandem-Stale", value: "true")) }
        return h
    }

    var isStale: Bool {
        let s = runtime.status
        return !(s.holdsLease || s.followsLivePrimary)
    }

    // MARK: /v1/execute and /v1/query

    func execute(_ call: ForwardedCall) async throws(APIError) -> ForwardedAnswer {
        executeAnswer(try await write(try executeBatch(call)))
    }

    /// The write batch a /v1/execute call asks for.
    func executeBatch(_ call: ForwardedCall) throws(APIError) -> WriteBatch {
        let body = try FieldReader(try JSONValue.parse(call.body), allowed: ["statements"])
        guard let items = try body.array("statements"), !items.isEmpty else {
            throw APIError.badRequest("missing_field", "statements is required: a non-empty array of {\"sql\": ..., \"params\": [...]}")
        }
        var statements: [SQLStatement] = []
        for (i, item) in items.enumerated() {
            statements.append(try statement(item, path: "statements[\(i)]"))
        }
        return WriteBatch(statements)
    }

    /// The answer to a /v1/execute call that committed.
    func executeAnswer(_ e: Execution) -> ForwardedAnswer {
        var writer = JSONWriter()
        writer.execution(e)
        return ForwardedAnswer(status: 200, headers: dataHeaders(lsn: e.record.lsn), body: writer.bytes)
    }

    func statement(_ v: JSONValue, path: String, extra: Set<String> = []) throws(APIError) -> SQLStatement {
        let f = try FieldReader(v, path: path, allowed: Set(["sql", "params"]).union(extra))
        let sql = try f.requiredString("sql")
        var params: [SQLValue] = []
        for (j, p) in (try f.array("params") ?? []).enumerated() { params.append(try SQLValue(json: p, path: "\(path).params[\(j)]")) }
        return SQLStatement(sql, params)
    }

    func consistency(_ text: String?) throws(APIError) -> ReadConsistency {
        guard let text else { return .linearizable }
        guard let c = ReadConsistency(rawValue: text) else {
            throw APIError.badRequest("bad_value", "consistency must be \"linearizable\" or \"local\", found \"\(text)\"")
        }
        return c
    }

    func query(_ call: ForwardedCall) async throws(APIError) -> ForwardedAnswer {
        let request = try queryRequest(call)
        return queryAnswer(try await read(request), consistency: request.consistency)
    }

    /// The read a /v1/query call asks for.
    func queryRequest(_ call: ForwardedCall) throws(APIError) -> ReadRequest {
        let v = try JSONValue.parse(call.body)
        let f = try FieldReader(v, allowed: ["sql", "params", "consistency", "min_lsn", "timeout_ms"])
        let s = try statement(v, path: "body", extra: ["consistency", "min_lsn", "timeout_ms"])
        let c = try consistency(try f.string("consistency"))
        let minLSN = try f.integer("min_lsn") ?? 0
        guard minLSN >= 0 else { throw APIError.badRequest("bad_value", "min_lsn must be 0 or more") }
        let timeout = try f.integer("timeout_ms")
        if let timeout, timeout < 0 || timeout > 60_000 { throw APIError.badRequest("bad_value", "timeout_ms must be between 0 and 60000") }
        return readRequest(s, consistency: c, minLSN: LSN(UInt64(minLSN)), waitMilliseconds: timeout.map { UInt32($0) })
    }

    /// The answer to a /v1/query call.
    func queryAnswer(_ r: QueryResult, consistency c: ReadConsistency) -> ForwardedAnswer {
        var body: [String: Any] = ["columns": r.columns, "rows": r.rows.map { $0.map(\.json) }, "lsn": r.appliedLSN.rawValue,
                                   "consistency": c.rawValue]
        if c == .local { body["stale"] = isStale }
        return ForwardedAnswer(status: 200, headers: dataHeaders(lsn: r.appliedLSN, consistency: c), body: encodeJSON(body))
    }

    // MARK: Operations

    /// Where state hashes are computed, one at a time: off the site's loop (a large
    /// database takes seconds, and a loop held that long stops heartbeats and sets off
    /// elections), and off Swift's cooperative threads (it blocks).
    private static let stateHashQueue = DispatchQueue(label: "tandem.state-hash")

    func stateHash() async throws(APIError) -> ForwardedAnswer {
        let admitted = stateHashesWaiting.withLock { n in
            guard n < Self.maxStateHashesWaiting else { return false }
            n += 1
            return true
        }
        guard admitted else {
            throw .unavailable("busy", "\(Self.maxStateHashesWaiting) state hashes are being computed or waiting; ask again later", retryAfter: 5)
        }
        defer { stateHashesWaiting.withLock { $0 -= 1 } }
        do {
            let file = try await runtime.withStore { $0.databaseFile }
            let (lsn, hash) = try await withCheckedThrowingContinuation { (c: CheckedContinuation<(lsn: LSN, hash: String), any Error>) in
                Self.stateHashQueue.async { c.resume(with: Result { () throws(StoreError) in try StateStore.stateHash(ofFile: file) }) }
            }
            return ForwardedAnswer(status: 200, headers: dataHeaders(lsn: lsn),
                                   body: encodeJSON(["site": settings.site.name, "lsn": lsn.rawValue, "state_hash": hash] as [String: Any]))
        } catch {
            throw APIError(status: 500, code: "state_hash_failed", message: "\(error)")
        }
    }

    func switchover(_ call: ForwardedCall) async throws(APIError) -> ForwardedAnswer {
        let f = try FieldReader(try JSONValue.parse(call.body), allowed: ["to"])
        let target = SiteID(try f.requiredString("to"))
        guard let d = runtime.settings.config.site(target) else { throw APIError.notFound("no site \(target) in this cluster") }
        guard d.role == .voter else { throw APIError.badRequest("bad_value", "\(target) is a witness; only a voter can become primary") }
        let s = runtime.status
        guard s.role == .primary else { throw APIError.misdirected("this site is not the primary") }
        if target == settings.site {
            return ForwardedAnswer(status: 200, headers: dataHeaders(lsn: s.commitLSN),
                                   body: encodeJSON(["primary": target.name, "term": s.term.rawValue] as [String: Any]))
        }
        let start = SiteRuntime.now
        runtime.transferLeadership(to: target)
        let deadline = start + UInt64(settings.switchoverWaitMilliseconds) * 1_000_000
        while SiteRuntime.now < deadline {
            try? await Task.sleep(nanoseconds: 20_000_000)
            let now = runtime.status
            if now.role != .primary, let p = now.primary, p != settings.site {
                let ms = Double(SiteRuntime.now - start) / 1e6
                return ForwardedAnswer(status: 200, headers: dataHeaders(lsn: now.commitLSN),
                                       body: encodeJSON(["primary": p.name, "term": now.term.rawValue, "milliseconds": ms] as [String: Any]))
            }
            if now.role == .primary && SiteRuntime.now - start > UInt64(runtime.settings.config.timing.transferTimeout) + 500_000_000 {
                break
            }
        }
        throw APIError.conflict("switchover_failed", "\(target) did not take over (not caught up or not reachable); \(settings.site) stays primary")
    }
}

/// The calls of the data API.
enum Route: Sendable {
    case execute, query
    case bookAppointment, listAppointments
    case cancelAppointment(Int64), rescheduleAppointment(Int64)
    case uploadDocument, document(Int64), listDocuments
    case exportAppointments
    case stateHash, switchover

    init(_ call: ForwardedCall) throws(APIError) {
        let parts = call.path.split(separator: "/").map(String.init)
        guard parts.first == "v1" else { throw APIError.notFound("no such path: \(call.path)") }
        let p = Array(parts.dropFirst())
        func id(_ s: String) throws(APIError) -> Int64 {
            guard let i = Int64(s), i > 0 else { throw APIError.notFound("\(s) is not an id") }
            return i
        }
        let m = call.method
        switch (m, p.count) {
        case ("POST", 1) where p[0] == "execute": self = .execute
        case ("POST", 1) where p[0] == "query": self = .query
        case ("POST", 1) where p[0] == "appointments": self = .bookAppointment
        case ("GET", 1) where p[0] == "appointments": self = .listAppointments
        case ("POST", 3) where p[0] == "appointments" && p[2] == "cancel": self = .cancelAppointment(try id(p[1]))
        case ("POST", 3) where p[0] == "appointments" && p[2] == "reschedule": self = .rescheduleAppointment(try id(p[1]))
        case ("POST", 1) where p[0] == "documents": self = .uploadDocument
        case ("GET", 1) where p[0] == "documents": self = .listDocuments
        case ("GET", 2) where p[0] == "documents": self = .document(try id(p[1]))
        case ("GET", 2) where p[0] == "export" && p[1] == "appointments": self = .exportAppointments
        case ("GET", 2) where p[0] == "admin" && p[1] == "state-hash": self = .stateHash
        case ("POST", 2) where p[0] == "admin" && p[1] == "switchover": self = .switchover
        default:
            let known = ["execute", "query", "appointments", "documents", "export", "admin"]
            if let first = p.first, known.contains(first) {
                throw APIError(status: 405, code: "method_not_allowed", message: "\(m) \(call.path) is not a call of this API")
            }
            throw APIError.notFound("no such path: \(call.path)")
        }
    }

    var scope: Scope {
        switch self {
        case .execute, .bookAppointment, .cancelAppointment, .rescheduleAppointment, .uploadDocument: .write
        case .switchover: .admin
        default: .read
        }
    }

    var isWrite: Bool { scope >= .write }

    /// Writes, and reads that ask for linearizability (the default), need the primary.
    func needsPrimary(_ call: ForwardedCall) throws(APIError) -> Bool {
        switch self {
        case .execute, .bookAppointment, .cancelAppointment, .rescheduleAppointment, .uploadDocument, .switchover: return true
        case .exportAppointments, .stateHash: return false
        case .query:
            // Only a body that mentions "local" can ask for a local read: skip parsing the
            // others twice (the handler parses it anyway).
            guard String(decoding: call.body, as: UTF8.self).contains("local") else { return true }
            let v = try JSONValue.parse(call.body)
            guard case let .object(o) = v else { return true }
            if case let .string(c)? = o["consistency"] { return c != "local" }
            return true
        case .listAppointments, .document, .listDocuments:
            return queryItem(call, "consistency") != "local"
        }
    }
}

/// A query-string parameter of a call.
func queryItem(_ call: ForwardedCall, _ name: String) -> String? {
    URLComponents(string: "http://x/?" + call.query)?.queryItems?.first { $0.name == name }?.value
}
