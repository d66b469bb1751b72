// Unmodified go-spiffe (v2.9.0) and spiffe-helper (v0.11.0) against Sigil.
//
// Run by tests/interop_go.rs, which starts two daemons admitting this uid
// and passes their sockets: SIGIL_SOCKET (1 h SVIDs) and
// SIGIL_ROTATION_SOCKET (4 s SVIDs, rotated at about half that). Run alone,
// every test skips.
package interop

import (
	"bufio"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var trustDomain = spiffeid.RequireTrustDomainFromString("sigil.test")

func socket(t *testing.T, name string) string {
	t.Helper()
	addr := os.Getenv(name)
	if addr == "" {
		t.Skipf("%s is not set: run through `cargo test --test interop_go`", name)
	}
	return addr
}

func timeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// checkSVID asserts what any SPIFFE verifier would: the chain verifies
// against the bundle to this process's ID, and the key is the leaf's.
func checkSVID(t *testing.T, svid *x509svid.SVID, bundles x509bundle.Source) {
	t.Helper()
	if svid.ID.TrustDomain() != trustDomain || !strings.HasPrefix(svid.ID.Path(), "/agent/tester/instance/") {
		t.Fatalf("unexpected SPIFFE ID %s", svid.ID)
	}
	id, chains, err := x509svid.Verify(svid.Certificates, bundles)
	if err != nil {
		t.Fatalf("x509svid.Verify: %v", err)
	}
	if id != svid.ID || len(chains) == 0 {
		t.Fatalf("verified %s (%d chains), want %s", id, len(chains), svid.ID)
	}
	signer, ok := svid.PrivateKey.(crypto.Signer)
	if !ok || !reflect.DeepEqual(signer.Public(), svid.Certificates[0].PublicKey) {
		t.Fatal("the private key does not match the leaf")
	}
}

func TestFetchX509Context(t *testing.T) {
	addr := socket(t, "SIGIL_SOCKET")
	ctx := timeout(t, 10*time.Second)
	xc, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		t.Fatalf("FetchX509Context: %v", err)
	}
	if len(xc.SVIDs) != 1 {
		t.Fatalf("got %d SVIDs, want the instance's one", len(xc.SVIDs))
	}
	if xc.SVIDs[0].Hint != "instance" {
		t.Fatalf("hint %q, want instance", xc.SVIDs[0].Hint)
	}
	checkSVID(t, xc.DefaultSVID(), xc.Bundles)
	if _, ok := xc.Bundles.Get(trustDomain); !ok {
		t.Fatal("no bundle for sigil.test")
	}
	// The verifiers' call answers the same bundle.
	bundles, err := workloadapi.FetchX509Bundles(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		t.Fatalf("FetchX509Bundles: %v", err)
	}
	got, _ := bundles.Get(trustDomain)
	want, _ := xc.Bundles.Get(trustDomain)
	if !got.Equal(want) {
		t.Fatal("FetchX509Bundles and FetchX509SVID disagree on the bundle")
	}
	t.Logf("FetchX509Context: %s, serial %x", xc.DefaultSVID().ID, xc.DefaultSVID().Certificates[0].SerialNumber)
}

func TestX509SourceSeesARotation(t *testing.T) {
	addr := socket(t, "SIGIL_ROTATION_SOCKET")
	ctx := timeout(t, 30*time.Second)
	source, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)))
	if err != nil {
		t.Fatalf("NewX509Source: %v", err)
	}
	defer source.Close()
	first, err := source.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	checkSVID(t, first, source)
	lifetime := first.Certificates[0].NotAfter.Sub(first.Certificates[0].NotBefore)
	deadline := time.Now().Add(lifetime + 5*time.Second)
	for {
		select {
		case <-source.Updated():
		case <-time.After(time.Until(deadline)):
			t.Fatalf("no rotation within the SVID's lifetime (%s) and 5 s", lifetime)
		}
		next, err := source.GetX509SVID()
		if err != nil {
			t.Fatal(err)
		}
		if next.Certificates[0].SerialNumber.Cmp(first.Certificates[0].SerialNumber) != 0 {
			if next.ID != first.ID {
				t.Fatalf("rotation changed the SPIFFE ID: %s -> %s", first.ID, next.ID)
			}
			if !next.Certificates[0].NotAfter.After(first.Certificates[0].NotAfter) {
				t.Fatal("the rotated SVID does not outlive the first")
			}
			if time.Now().After(first.Certificates[0].NotAfter) {
				t.Fatal("rotated only after the first SVID expired")
			}
			checkSVID(t, next, source)
			t.Logf("X509Source rotated %x -> %x", first.Certificates[0].SerialNumber, next.Certificates[0].SerialNumber)
			return
		}
	}
}

// Sigil serves X.509-SVIDs only. Each JWT call must get a prompt, precise
// answer (Unimplemented, as the Workload API standard lets an
// implementation that does not serve JWT-SVIDs say), never a hang.
func TestJWTCallsAnswerUnimplemented(t *testing.T) {
	addr := socket(t, "SIGIL_SOCKET")
	ctx := timeout(t, 10*time.Second)
	client, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	calls := map[string]func() error{
		"FetchJWTSVID": func() error {
			_, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "service"})
			return err
		},
		"FetchJWTBundles": func() error {
			_, err := client.FetchJWTBundles(ctx)
			return err
		},
		"ValidateJWTSVID": func() error {
			_, err := client.ValidateJWTSVID(ctx, "e30.e30.e30", "service")
			return err
		},
	}
	for name, call := range calls {
		start := time.Now()
		err := call()
		if code := status.Code(err); code != codes.Unimplemented {
			t.Errorf("%s: %v (code %s), want Unimplemented", name, err, code)
		}
		if took := time.Since(start); took > 2*time.Second {
			t.Errorf("%s took %s", name, took)
		}
	}
}

// The mTLS server runs in a child process (this test binary again), so
// the two sides are two instances with two SVIDs.
func TestSpiffeTLSMutualAuthentication(t *testing.T) {
	addr := socket(t, "SIGIL_SOCKET")
	ctx := timeout(t, 30*time.Second)
	source, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)))
	if err != nil {
		t.Fatal(err)
	}
	defer source.Close()
	mine, _ := source.GetX509SVID()

	child := exec.Command(os.Args[0], "-test.run=^TestMTLSServerChild$", "-test.v")
	child.Env = append(os.Environ(), "SIGIL_MTLS_CHILD=1")
	child.Stderr = os.Stderr
	out, _ := child.StdoutPipe()
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = child.Process.Kill(); _ = child.Wait() }()
	lines := bufio.NewScanner(out)
	var open, strict, serverID string
	for lines.Scan() {
		if _, err := fmt.Sscanf(lines.Text(), "SERVING %s %s %s", &open, &strict, &serverID); err == nil {
			break
		}
	}
	if serverID == "" {
		t.Fatal("the server child did not start")
	}
	if serverID == mine.ID.String() {
		t.Fatalf("both sides hold %s: want two instances", serverID)
	}
	server := spiffeid.RequireFromString(serverID)

	// AuthorizeID on the client, AuthorizeMemberOf on the server.
	conn, err := spiffetls.DialWithMode(ctx, "tcp", open, spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(server), source))
	if err != nil {
		t.Fatalf("mTLS dial: %v", err)
	}
	if _, err := fmt.Fprintln(conn, "hello"); err != nil {
		t.Fatal(err)
	}
	reply, err := bufio.NewReader(conn).ReadString('\n')
	conn.Close()
	if err != nil {
		t.Fatal(err)
	}
	if want := "hello " + mine.ID.String() + "\n"; reply != want {
		t.Fatalf("server answered %q, want %q", reply, want)
	}

	// A client that expects another ID refuses the server.
	other := spiffeid.RequireFromPath(trustDomain, "/agent/someone-else")
	if conn, err := spiffetls.DialWithMode(ctx, "tcp", open, spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(other), source)); err == nil {
		conn.Close()
		t.Fatal("a client authorizing only another ID connected")
	}
	// A server that authorizes only another ID refuses this client: the
	// handshake or the first read fails.
	conn, err = spiffetls.DialWithMode(ctx, "tcp", strict, spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeMemberOf(trustDomain), source))
	if err == nil {
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		_, _ = fmt.Fprintln(conn, "hello")
		_, err = bufio.NewReader(conn).ReadString('\n')
		conn.Close()
	}
	if err == nil {
		t.Fatal("a server authorizing only another ID served this client")
	}
	t.Logf("mTLS between %s and %s; refusals: %v", mine.ID, server, err)
}

// The server side of TestSpiffeTLSMutualAuthentication; skipped unless that
// test started it.
func TestMTLSServerChild(t *testing.T) {
	if os.Getenv("SIGIL_MTLS_CHILD") == "" {
		t.Skip("started by TestSpiffeTLSMutualAuthentication only")
	}
	addr := socket(t, "SIGIL_SOCKET")
	ctx := context.Background()
	source, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)))
	if err != nil {
		t.Fatal(err)
	}
	defer source.Close()
	svid, _ := source.GetX509SVID()
	open, err := spiffetls.ListenWithMode(ctx, "tcp", "127.0.0.1:0", spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeMemberOf(trustDomain), source))
	if err != nil {
		t.Fatal(err)
	}
	nobody := spiffeid.RequireFromPath(trustDomain, "/agent/nobody")
	strict, err := spiffetls.ListenWithMode(ctx, "tcp", "127.0.0.1:0", spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeID(nobody), source))
	if err != nil {
		t.Fatal(err)
	}
	go serve(strict)
	fmt.Printf("SERVING %s %s %s\n", open.Addr(), strict.Addr(), svid.ID)
	serve(open)
}

// serve answers each connection's first line with the line and the peer's
// SPIFFE ID, as the server's side of the handshake verified it.
func serve(l net.Listener) {
	for {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
			line, err := bufio.NewReader(conn).ReadString('\n')
			if err != nil {
				return
			}
			id, err := spiffetls.PeerIDFromConn(conn)
			if err != nil {
				return
			}
			fmt.Fprintf(conn, "%s %s\n", strings.TrimSpace(line), id)
		}()
	}
}

// spiffe-helper, built from its module (a tool of this go.mod), in daemon
// mode against 4 s SVIDs: it writes the SVID, key and bundle, rewrites them
// on each rotation, starts its command once and signals it after each
// rewrite; the files verify with openssl.
func TestSpiffeHelperDaemonMode(t *testing.T) {
	addr := socket(t, "SIGIL_ROTATION_SOCKET")
	dir := t.TempDir()
	helper := filepath.Join(dir, "spiffe-helper")
	build := exec.Command("go", "build", "-o", helper, "github.com/spiffe/spiffe-helper/cmd/spiffe-helper")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build spiffe-helper: %v\n%s", err, out)
	}
	certs := filepath.Join(dir, "certs")
	if err := os.Mkdir(certs, 0o700); err != nil {
		t.Fatal(err)
	}
	signals := filepath.Join(dir, "signals.log")
	script := filepath.Join(dir, "child.sh")
	// The child records its start and every SIGUSR1 it receives.
	writeFile(t, script, "trap 'echo renewed >> \"$1\"' USR1\necho started >> \"$1\"\nwhile :; do sleep 0.1 & wait $!; done\n")
	config := filepath.Join(dir, "helper.conf")
	writeFile(t, config, fmt.Sprintf(`agent_address = %q
cmd = "/bin/sh"
cmd_args = "%s %s"
cert_dir = %q
renew_signal = "SIGUSR1"
svid_file_name = "svid.pem"
svid_key_file_name = "svid_key.pem"
svid_bundle_file_name = "svid_bundle.pem"
daemon_mode = true
`, strings.TrimPrefix(addr, "unix://"), script, signals, certs))
	cmd := exec.Command(helper, "-config", config)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	log, err := os.Create(filepath.Join(dir, "helper.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // the helper and its child
		_ = cmd.Wait()
		if t.Failed() {
			out, _ := os.ReadFile(filepath.Join(dir, "helper.log"))
			t.Logf("spiffe-helper's log:\n%s", out)
		}
	}()

	svidFile := filepath.Join(certs, "svid.pem")
	serials := map[string]bool{}
	deadline := time.Now().Add(20 * time.Second)
	for len(serials) < 3 && time.Now().Before(deadline) {
		if leaf := readLeaf(svidFile); leaf != nil {
			serials[leaf.SerialNumber.String()] = true
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(serials) < 3 {
		t.Fatalf("saw %d SVIDs in %s within 20 s, want the first and two rotations", len(serials), svidFile)
	}
	// Each rewrite signals the child: started once, then renewed.
	var lines []string
	for time.Now().Before(deadline.Add(5 * time.Second)) {
		data, _ := os.ReadFile(signals)
		lines = strings.Fields(string(data))
		if len(lines) >= 3 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(lines) < 3 || lines[0] != "started" || lines[1] != "renewed" {
		t.Fatalf("the child recorded %q, want started then renewed at least twice", lines)
	}
	// The files as any TLS server would load them.
	bundle := filepath.Join(certs, "svid_bundle.pem")
	key := filepath.Join(certs, "svid_key.pem")
	if out, err := exec.Command("openssl", "verify", "-CAfile", bundle, svidFile).CombinedOutput(); err != nil {
		t.Fatalf("openssl verify: %v\n%s", err, out)
	}
	certKey, err1 := exec.Command("openssl", "x509", "-in", svidFile, "-noout", "-pubkey").Output()
	keyPub, err2 := exec.Command("openssl", "pkey", "-in", key, "-pubout").Output()
	if err1 != nil || err2 != nil || string(certKey) != string(keyPub) {
		t.Fatalf("the key file does not match the certificate (%v, %v)", err1, err2)
	}
	if info, err := os.Stat(key); err != nil || info.Mode().Perm()&0o077 != 0 {
		t.Fatalf("the key file is readable by others: %v", info.Mode())
	}
	t.Logf("spiffe-helper wrote %d SVIDs; the child saw %q", len(serials), lines)
}

func writeFile(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}

// readLeaf is the first certificate of a PEM file, or nil while the file
// is missing or being replaced.
func readLeaf(path string) *x509.Certificate {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil
	}
	return cert
}
