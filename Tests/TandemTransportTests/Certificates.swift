import Foundation

/// Certificates made with the openssl command line for the tests: a cluster CA, sites
/// a, b, c; another CA; an expired and a not-yet-valid certificate for a.
struct TestPKI: Sendable {
    let dir: String

    static let shared: TestPKI = {
        let dir = NSTemporaryDirectory() + "tandem-pki-\(UUID().uuidString)"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let pki = TestPKI(dir: dir)
        pki.makeCA("ca", "Tandem test cluster CA")
        pki.makeCA("other-ca", "Somebody else's CA")
        for site in ["a", "b", "c"] { pki.makeSite(site, ca: "ca") }
        pki.makeSite("a", ca: "other-ca", name: "a-other")
        pki.makeSite("a", ca: "ca", name: "a-expired", start: "20200101000000Z", end: "20200201000000Z")
        pki.makeSite("a", ca: "ca", name: "a-future", start: "20990101000000Z", end: "20991231000000Z")
        return pki
    }()

    func path(_ name: String) -> String { dir + "/" + name }

    @discardableResult
    func run(_ args: [String]) -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        p.arguments = args
        p.currentDirectoryURL = URL(fileURLWithPath: dir)
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try? p.run()
        p.waitUntilExit()
        return p.terminationStatus
    }

    func makeCA(_ name: String, _ subject: String) {
        run(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "\(name).key",
             "-out", "\(name).pem", "-days", "3650", "-subj", "/CN=\(subject)"])
        _ = FileManager.default.createFile(atPath: path("\(name)-index.txt"), contents: Data())
        _ = FileManager.default.createFile(atPath: path("\(name)-serial"), contents: Data("1000\n".utf8))
        let cnf = """
        [ ca ]
        default_ca = local
        [ local ]
        database = \(path("\(name)-index.txt"))
        new_certs_dir = \(dir)
        serial = \(path("\(name)-serial"))
        default_md = sha256
        policy = any
        unique_subject = no
        [ any ]
        commonName = supplied
        """
        _ = FileManager.default.createFile(atPath: path("\(name).cnf"), contents: Data(cnf.utf8))
    }

    /// A site certificate naming `site` in its subject alternative name.
    func makeSite(_ site: String, ca: String, name: String? = nil, start: String? = nil, end: String? = nil) {
        let n = name ?? site
        run(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "\(n).key", "-out", "\(n).csr", "-subj", "/CN=\(site)"])
        let ext = "subjectAltName=DNS:\(site)\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
        _ = FileManager.default.createFile(atPath: path("\(n).ext"), contents: Data(ext.utf8))
        var args = ["ca", "-batch", "-notext", "-config", "\(ca).cnf", "-cert", "\(ca).pem", "-keyfile", "\(ca).key",
                    "-in", "\(n).csr", "-out", "\(n).pem", "-extfile", "\(n).ext"]
        if let start, let end { args += ["-startdate", start, "-enddate", end] } else { args += ["-days", "365"] }
        run(args)
    }
}
