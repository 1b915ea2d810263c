import Foundation
import Testing
import TandemCore
@testable import TandemConfig

let caLine = "ca = \"/etc/tandem/ca.pem\""

let sample = """
# Strasbourg site
cluster_id = "0b6f3a3e-6a53-4d0e-9f0c-5c2d8e8f7a10"
site_id = "sbg"
data_directory = "/var/lib/tandem"
commit_policy = "majority-two-domains"

[listen]
peer = "10.0.1.10:7401"   # TLS between sites
http = "10.0.1.10:8401"

[timing]
lease_ms = 2_000
drift_bound = 0.01

[tls]
certificate = "/etc/tandem/sbg.pem"
private_key = '/etc/tandem/sbg.key'
ca = "/etc/tandem/ca.pem"

[[sites]]
id = "sbg"
domain = "strasbourg"
peer_address = "10.0.1.10:7401"
http_address = "10.0.1.10:8401"

[[sites]]
id = "gra"
domain = "gravelines"
peer_address = "10.0.2.10:7401"
http_address = "10.0.2.10:8401"

[[sites]]
id = "witness"
domain = "paris"
role = "witness"
peer_address = "10.0.3.10:7401"
http_address = "10.0.3.10:8401"
"""

@Suite("TOML reader")
struct TOMLTests {
    @Test("tables, arrays of tables, strings, numbers, booleans, arrays and inline tables")
    func parses() throws {
        let t = try TOMLParser.parse("""
        a = 1
        b = "x\\ty \\u00e9"   # comment
        c = [1, 2,
             3,]
        d.e = true
        f = { g = 1.5, h = 'lit\\eral' }
        [t]
        k = -3
        [[arr]]
        n = 1
        [[arr]]
        n = 2
        """)
        #expect(t["a"] == .integer(1))
        #expect(t["b"] == .string("x\ty é"))
        #expect(t["c"] == .array([.integer(1), .integer(2), .integer(3)]))
        guard case let .table(d)? = t["d"], case let .table(f)? = t["f"], case let .table(tt)? = t["t"], case let .array(arr)? = t["arr"] else {
            Issue.record("structure")
            return
        }
        #expect(d["e"] == .bool(true))
        #expect(f["g"] == .float(1.5) && f["h"] == .string("lit\\eral"))
        #expect(tt["k"] == .integer(-3))
        #expect(arr.count == 2)
        #expect(t.line(of: "c") == 3)
    }

    @Test("malformed documents are refused with line and column", arguments: [
        ("a = ", 1, "expected a value"),
        ("a = 1\na = 2", 2, "defined twice"),
        ("[t]\n[t]", 2, "defined twice"),
        ("a = \"open", 1, "unterminated string"),
        ("a = 1 b", 1, "end of the line"),
        ("a = 2024-01-01", 1, "dates are not supported"),
        ("a = 0x10", 1, "decimal"),
        ("a = [1, 2", 1, "in an array"),
    ] as [(String, Int, String)])
    func refuses(text: String, line: Int, message: String) {
        do {
            _ = try TOMLParser.parse(text)
            Issue.record("accepted: \(text)")
        } catch {
            #expect(error.line == line, "\(error)")
            #expect(error.message.contains(message), "\(error)")
        }
    }
}

@Suite("Site configuration")
struct SiteConfigurationTests {
    @Test("a complete file loads, with defaults for what it leaves out")
    func loads() throws {
        let c = try SiteConfiguration.parse(sample, file: "sbg.toml")
        #expect(c.siteID == "sbg" && c.sites.count == 3)
        #expect(c.commitPolicy == .majorityTwoDomains)
        #expect(c.timing.leaseDuration == .seconds(2) && c.timing.heartbeatInterval == .milliseconds(300))
        #expect(c.timing.electionJitter == .milliseconds(200))
        #expect(c.peerTimeoutMilliseconds == 3000)
        // Without a lease in the file: 1.5 s, the default the cluster benchmark measures.
        let bare = try SiteConfiguration.parse(sample.replacingOccurrences(of: "lease_ms = 2_000\n", with: ""), file: "sbg.toml")
        #expect(bare.timing.leaseDuration == .milliseconds(1500))
        #expect(c.sites[2].role == .witness)
        #expect(c.cluster.placementWarnings.isEmpty)
        #expect(c.directIO, "log batches are written with O_DIRECT unless the file says otherwise")
        let buffered = try SiteConfiguration.parse(sample.replacingOccurrences(of: caLine, with: caLine + "\n\n[storage]\ndirect_io = false"), file: "sbg.toml")
        #expect(!buffered.directIO)
        #expect(c.snapshotEveryRecords == 100_000 && c.snapshotLogFraction == 0.5)
        let recordsOnly = try SiteConfiguration.parse(sample.replacingOccurrences(of: caLine, with: caLine + "\n\n[storage]\nsnapshot_log_fraction = 0"), file: "sbg.toml")
        #expect(recordsOnly.snapshotLogFraction == 0)
    }

    @Test("an environment variable overrides a single key")
    func environment() throws {
        let c = try SiteConfiguration.parse(sample, file: "sbg.toml", environment: ["TANDEM_TIMING_LEASE_MS": "3000", "TANDEM_LISTEN_HTTP": "0.0.0.0:9000",
                                                                                  "TANDEM_API_TOKEN_FILE": "/etc/tandem/tokens"])
        #expect(c.timing.leaseDuration == .seconds(3))
        #expect(c.listenHTTP == "0.0.0.0:9000")
        #expect(c.apiTokenFile == "/etc/tandem/tokens")
    }

    @Test("each kind of bad file names the file, the key, the line and what was expected", arguments: [
        ("lease_ms = 2_000", "lease_ms = 2_000\nbogus = 1", "timing.bogus", 13, "one of the known keys"),
        ("site_id = \"sbg\"", "site_id = \"lyon\"", "site_id", 3, "one of the [[sites]] ids"),
        ("id = \"gra\"", "id = \"Gravelines 1\"", "sites[1].id", 27, "lowercase letters, digits and inner hyphens"),
        ("site_id = \"sbg\"", "site_id = \"sbg-\"", "site_id", 3, "a DNS label"),
        ("lease_ms = 2_000", "lease_ms = \"long\"", "timing.lease_ms", 12, "an integer"),
        ("lease_ms = 2_000", "lease_ms = 800", "timing.heartbeat_ms", nil, "at most a third"),
        ("lease_ms = 2_000", "lease_ms = 2_000\npeer_timeout_ms = 50", "timing.peer_timeout_ms", 13, "between 300"),
        ("commit_policy = \"majority-two-domains\"", "commit_policy = \"eventual\"", "commit_policy", 5, "\"majority\""),
        ("peer = \"10.0.1.10:7401\"   # TLS between sites", "peer = \"10.0.1.10\"", "listen.peer", 8, "host:port"),
        ("role = \"witness\"", "role = \"observer\"", "sites[2].role", 35, "\"voter\" or \"witness\""),
        ("cluster_id = \"0b6f3a3e-6a53-4d0e-9f0c-5c2d8e8f7a10\"", "cluster_id = \"strasbourg\"", "cluster_id", 2, "a UUID"),
        ("ca = \"/etc/tandem/ca.pem\"", "", "tls.ca", nil, "required"),
        ("lease_ms = 2_000", "lease_ms = = 2", "(syntax)", 12, "valid TOML"),
        (caLine, caLine + "\n\n[api]\nmax_document_bytes = 99999999", "api.max_document_bytes", 21, "an integer between"),
        (caLine, caLine + "\n\n[api]\nmax_body_bytes = 2048\nmax_document_bytes = 4096", "api.max_document_bytes", 22, "at most api.max_body_bytes"),
        (caLine, caLine + "\n\n[api]\nwait_for_primary_ms = -1", "api.wait_for_primary_ms", 21, "between 0"),
        (caLine, caLine + "\n\n[api]\ntoken_file = 7", "api.token_file", 21, "a non-empty string"),
        (caLine, caLine + "\n\n[hooks]\ncommand = \"/usr/local/bin/notify\"\ntimeout = 5", "hooks.timeout", 22, "one of the known keys"),
        (caLine, caLine + "\n\n[hooks]\ntimeout_ms = 1", "hooks.timeout_ms", 21, "between 10"),
        (caLine, caLine + "\n\n[logging]\nformat = \"xml\"", "logging.format", 21, "\"keyvalue\" or \"json\""),
        (caLine, caLine + "\n\n[storage]\ndirect_io = \"yes\"", "storage.direct_io", 21, "true or false"),
        (caLine, caLine + "\n\n[storage]\nsnapshot_log_fraction = -1", "storage.snapshot_log_fraction", 21, "between 0"),
    ] as [(String, String, String, Int?, String)])
    func badFiles(replace: String, with: String, key: String, line: Int?, expected: String) {
        let text = sample.replacingOccurrences(of: replace, with: with)
        do {
            _ = try SiteConfiguration.parse(text, file: "sbg.toml")
            Issue.record("accepted a file with \(with)")
        } catch {
            #expect(error.file == "sbg.toml")
            #expect(error.key == key, "\(error)")
            if let line { #expect(error.line == line, "\(error)") }
            #expect(error.expected.contains(expected), "\(error)")
        }
    }

    @Test("placement: a failure domain holding a majority of the votes is reported")
    func placement() throws {
        let oneCampus = sample.replacingOccurrences(of: "domain = \"gravelines\"", with: "domain = \"strasbourg\"")
        let c = try SiteConfiguration.parse(oneCampus, file: "sbg.toml")
        #expect(c.cluster.placementWarnings.contains { $0.contains("strasbourg holds 2 of 3 votes") })
    }
}
