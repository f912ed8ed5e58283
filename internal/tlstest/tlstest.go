// Package tlstest makes a throwaway certificate authority and a server certificate signed by it,
// for tests of TLS to PostgreSQL and Kafka.
package tlstest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Certs are a CA and a server certificate for 127.0.0.1 and localhost, as PEM files in Dir.
type Certs struct {
	Dir      string // holds the files; readable by everyone, the key by its owner only
	CAFile   string // the CA certificate: what a client trusts
	CertFile string // the server certificate, signed by the CA
	KeyFile  string // the server's private key
	// Server is a TLS configuration serving the server certificate.
	Server *tls.Config
	// ClientCertFile and ClientKeyFile are a client certificate (CN "outbox-relay"), signed by
	// the CA, and its key: what a client presents for mutual TLS.
	ClientCertFile, ClientKeyFile string
	// MutualServer serves the server certificate and requires a client certificate signed by
	// the CA (mutual TLS).
	MutualServer *tls.Config
}

// New writes a fresh CA and server certificate into a temporary directory removed when t ends.
func New(t testing.TB) *Certs {
	t.Helper()
	dir, err := os.MkdirTemp("", "tlstest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil { // a server running as another user reads it
		t.Fatal(err)
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "outbox-relay test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	c := &Certs{
		Dir:      dir,
		CAFile:   filepath.Join(dir, "ca.crt"),
		CertFile: filepath.Join(dir, "server.crt"),
		KeyFile:  filepath.Join(dir, "server.key"),
	}
	write := func(path, typ string, der []byte, mode os.FileMode) {
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
			t.Fatal(err)
		}
	}
	write(c.CAFile, "CERTIFICATE", caDER, 0o644)
	write(c.CertFile, "CERTIFICATE", der, 0o644)
	write(c.KeyFile, "PRIVATE KEY", keyDER, 0o600)
	pair, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	c.Server = &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}

	clientKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	clientDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(3),
		Subject:      pkix.Name{CommonName: "outbox-relay"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca, &clientKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	clientKeyDER, err := x509.MarshalPKCS8PrivateKey(clientKey)
	if err != nil {
		t.Fatal(err)
	}
	c.ClientCertFile, c.ClientKeyFile = filepath.Join(dir, "client.crt"), filepath.Join(dir, "client.key")
	write(c.ClientCertFile, "CERTIFICATE", clientDER, 0o644)
	write(c.ClientKeyFile, "PRIVATE KEY", clientKeyDER, 0o600)
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	c.MutualServer = &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12,
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool}
	return c
}

// Chown gives the key and certificate files to uid:gid, for a server that runs as another user
// and requires its key to be its own (PostgreSQL).
func (c *Certs) Chown(uid, gid int) error {
	for _, f := range []string{c.CAFile, c.CertFile, c.KeyFile} {
		if err := os.Chown(f, uid, gid); err != nil {
			return err
		}
	}
	return nil
}
