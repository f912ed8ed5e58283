package kafka_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/internal/tlstest"
)

// saslBroker is a kfake cluster over TLS that speaks one more SASL mechanism than kfake does:
// its handshake takes mechanism, and accept judges each authentication's bytes (the broker's
// answer is ok; the bytes are kept). kfake serves every other request as usual.
type saslBroker struct {
	cluster *kfake.Cluster
	mu      sync.Mutex
	auths   [][]byte
}

func newSASLBroker(t *testing.T, certs *tlstest.Certs, mechanism string, accept func([]byte) bool) *saslBroker {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "secure"), kfake.TLS(certs.Server))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	b := &saslBroker{cluster: c}
	c.ControlKey(int16(kmsg.SASLHandshake), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		r := req.(*kmsg.SASLHandshakeRequest)
		resp := r.ResponseKind().(*kmsg.SASLHandshakeResponse)
		resp.SupportedMechanisms = []string{mechanism}
		if r.Mechanism != mechanism {
			resp.ErrorCode = kerr.UnsupportedSaslMechanism.Code
		}
		return resp, nil, true
	})
	c.ControlKey(int16(kmsg.SASLAuthenticate), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		r := req.(*kmsg.SASLAuthenticateRequest)
		b.mu.Lock()
		b.auths = append(b.auths, append([]byte(nil), r.SASLAuthBytes...))
		b.mu.Unlock()
		resp := r.ResponseKind().(*kmsg.SASLAuthenticateResponse)
		if !accept(r.SASLAuthBytes) {
			resp.ErrorCode = kerr.SaslAuthenticationFailed.Code
			msg := "authentication failed"
			resp.ErrorMessage = &msg
		} else if mechanism == kafka.MechanismAWSMSKIAM {
			resp.SASLAuthBytes = []byte(`{"version":"2020_10_22","request-id":"test"}`)
		}
		return resp, nil, true
	})
	return b
}

// last returns the bytes of the last authentication.
func (b *saslBroker) last() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.auths) == 0 {
		return nil
	}
	return b.auths[len(b.auths)-1]
}

// bearer is the OAUTHBEARER initial response of token (RFC 7628) with franz-go's extensions.
func bearer(token string) string { return "auth=Bearer " + token + "\x01" }

// TestOAuthBearerTokenFile: OAUTHBEARER sends the token of kafka.sasl.oauth.token_file, read
// again at each authentication (a new publisher, here, sees the rewritten file); a token the
// broker refuses fails the connection without the token in the error.
func TestOAuthBearerTokenFile(t *testing.T) {
	t.Parallel()
	certs := tlstest.New(t)
	var valid atomic.Value
	valid.Store("token-one")
	b := newSASLBroker(t, certs, kafka.MechanismOAuthBearer, func(auth []byte) bool {
		return strings.Contains(string(auth), bearer(valid.Load().(string)))
	})
	file := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(file, []byte("token-one\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := kafka.Config{Brokers: b.cluster.ListenAddrs(), TopicTemplate: "secure",
		TLS:  kafka.TLSConfig{Enabled: true, CAFile: certs.CAFile},
		SASL: kafka.SASLConfig{Mechanism: "OAUTHBEARER", OAuth: kafka.OAuthConfig{TokenFile: file}}}
	if err := publishOne(t, cfg); err != nil {
		t.Fatalf("publish with the token file: %v", err)
	}
	if !strings.HasPrefix(string(b.last()), "n,,\x01"+bearer("token-one")) {
		t.Errorf("authentication bytes %q, want the GS2 header and the file's token", b.last())
	}

	valid.Store("token-two") // the platform rotated the token: the old one is refused
	if err := os.WriteFile(file, []byte("token-two"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := publishOne(t, cfg); err != nil {
		t.Fatalf("publish after the token file changed: %v", err)
	}
	if !strings.Contains(string(b.last()), bearer("token-two")) {
		t.Errorf("authentication bytes %q, want the new token", b.last())
	}

	valid.Store("token-three")
	err := publishOne(t, cfg)
	if err == nil {
		t.Fatal("a refused token connected")
	}
	if strings.Contains(err.Error(), "token-two") {
		t.Errorf("the error shows the token: %v", err)
	}
}

// TestOAuthBearerTokenErrorsReported: each time OAUTHBEARER cannot get a token (the file gone,
// then empty; the endpoint refusing the client) the connection fails and OnTokenError hears of
// it, which the daemon counts in outbox_relay_sasl_token_errors_total; a good token calls it not.
func TestOAuthBearerTokenErrorsReported(t *testing.T) {
	t.Parallel()
	certs := tlstest.New(t)
	b := newSASLBroker(t, certs, kafka.MechanismOAuthBearer, func(auth []byte) bool {
		return strings.Contains(string(auth), bearer("good-token"))
	})
	var mu sync.Mutex
	var reported []error
	file := filepath.Join(t.TempDir(), "token")
	cfg := kafka.Config{Brokers: b.cluster.ListenAddrs(), TopicTemplate: "secure",
		TLS: kafka.TLSConfig{Enabled: true, CAFile: certs.CAFile},
		SASL: kafka.SASLConfig{Mechanism: "OAUTHBEARER", OAuth: kafka.OAuthConfig{TokenFile: file},
			OnTokenError: func(err error) {
				mu.Lock()
				defer mu.Unlock()
				reported = append(reported, err)
			}}}
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(reported)
	}
	if err := publishOne(t, cfg); err == nil {
		t.Fatal("published without a token file")
	}
	if n := count(); n == 0 {
		t.Fatal("a missing token file was not reported")
	}
	mu.Lock()
	if !strings.Contains(reported[0].Error(), "kafka.sasl.oauth.token_file") {
		t.Errorf("reported %v, want an error naming kafka.sasl.oauth.token_file", reported[0])
	}
	mu.Unlock()
	if err := os.WriteFile(file, []byte(" \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	before := count()
	if err := publishOne(t, cfg); err == nil {
		t.Fatal("published with an empty token file")
	}
	if count() == before {
		t.Error("an empty token file was not reported")
	}
	if err := os.WriteFile(file, []byte("good-token"), 0o600); err != nil {
		t.Fatal(err)
	}
	before = count()
	if err := publishOne(t, cfg); err != nil {
		t.Fatalf("publish with a good token: %v", err)
	}
	if count() != before {
		t.Errorf("a good token was reported as a failure: %v", reported[before:])
	}

	idp := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusUnauthorized)
		_ = json.NewEncoder(w).Encode(map[string]string{"error": "invalid_client"})
	}))
	defer idp.Close()
	endpoint := cfg
	endpoint.SASL.OAuth = kafka.OAuthConfig{TokenURL: idp.URL + "/token", ClientID: "relay", ClientSecret: "Some-Secret-Value"}
	before = count()
	if err := publishOne(t, endpoint); err == nil {
		t.Fatal("published with a refused client")
	}
	if count() == before {
		t.Error("a token endpoint refusing the client was not reported")
	}
	mu.Lock()
	for _, err := range reported {
		if strings.Contains(err.Error(), "Some-Secret-Value") {
			t.Errorf("a reported error shows the client secret: %v", err)
		}
	}
	mu.Unlock()
}

// TestOAuthBearerClientCredentials: with kafka.sasl.oauth.token_url the relay gets a token with
// the client-credentials grant (HTTP Basic client authentication, the scope asked), keeps it
// while it is valid, and sends it to the broker; a wrong client secret fails with the endpoint's
// error, never the secret.
func TestOAuthBearerClientCredentials(t *testing.T) {
	t.Parallel()
	certs := tlstest.New(t)
	const secret = "s3cret-Client-Value"
	var issued atomic.Int32
	idp := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, pass, ok := r.BasicAuth()
		if err := r.ParseForm(); err != nil || r.Form.Get("grant_type") != "client_credentials" || r.Form.Get("scope") != "kafka" {
			w.WriteHeader(http.StatusBadRequest)
			_ = json.NewEncoder(w).Encode(map[string]string{"error": "invalid_request"})
			return
		}
		if !ok || id != "relay" || pass != secret {
			w.WriteHeader(http.StatusUnauthorized)
			_ = json.NewEncoder(w).Encode(map[string]string{"error": "invalid_client", "error_description": "bad client credentials"})
			return
		}
		issued.Add(1)
		_ = json.NewEncoder(w).Encode(map[string]any{"access_token": "idp-token", "token_type": "Bearer", "expires_in": 3600})
	}))
	defer idp.Close()
	b := newSASLBroker(t, certs, kafka.MechanismOAuthBearer, func(auth []byte) bool {
		return strings.Contains(string(auth), bearer("idp-token"))
	})
	cfg := kafka.Config{Brokers: b.cluster.ListenAddrs(), TopicTemplate: "secure",
		TLS: kafka.TLSConfig{Enabled: true, CAFile: certs.CAFile},
		SASL: kafka.SASLConfig{Mechanism: "OAUTHBEARER", OAuth: kafka.OAuthConfig{TokenURL: idp.URL + "/token",
			ClientID: "relay", ClientSecret: secret, Scope: "kafka", Extensions: map[string]string{"logicalCluster": "lkc-1"}}}}
	if err := publishOne(t, cfg); err != nil {
		t.Fatalf("publish with a client-credentials token: %v", err)
	}
	if n := issued.Load(); n < 1 {
		t.Errorf("the token endpoint issued %d tokens", n)
	}
	if !strings.Contains(string(b.last()), "logicalCluster=lkc-1\x01") {
		t.Errorf("authentication bytes %q lack the extension", b.last())
	}

	bad := cfg
	bad.SASL.OAuth.ClientSecret = "Wrong-Secret-Value"
	err := publishOne(t, bad)
	if err == nil {
		t.Fatal("a wrong client secret connected")
	}
	if strings.Contains(err.Error(), "Wrong-Secret-Value") || strings.Contains(err.Error(), secret) {
		t.Errorf("the error shows a secret: %v", err)
	}
}

// TestAWSMSKIAM: AWS_MSK_IAM signs the authentication with the credentials of the standard AWS
// chain (here the environment, with a session token) for the region of AWS_REGION. kfake does not
// check AWS signatures: the test checks the request names the access key, the region and the
// session token, and that the secret key is not in it. Not parallel: it sets the environment.
func TestAWSMSKIAM(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIATESTKEY")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "test-secret-access-key")
	t.Setenv("AWS_SESSION_TOKEN", "test-session-token")
	t.Setenv("AWS_REGION", "eu-west-3")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	certs := tlstest.New(t)
	b := newSASLBroker(t, certs, kafka.MechanismAWSMSKIAM, func(auth []byte) bool {
		var req map[string]string
		return json.Unmarshal(auth, &req) == nil && req["action"] == "kafka-cluster:Connect"
	})
	cfg := kafka.Config{Brokers: b.cluster.ListenAddrs(), TopicTemplate: "secure",
		TLS:  kafka.TLSConfig{Enabled: true, CAFile: certs.CAFile},
		SASL: kafka.SASLConfig{Mechanism: "AWS_MSK_IAM"}}
	if err := publishOne(t, cfg); err != nil {
		t.Fatalf("publish with AWS_MSK_IAM: %v", err)
	}
	var req map[string]string
	if err := json.Unmarshal(b.last(), &req); err != nil {
		t.Fatalf("authentication bytes are not JSON: %v: %q", err, b.last())
	}
	if !strings.HasPrefix(req["x-amz-credential"], "AKIATESTKEY/") || !strings.Contains(req["x-amz-credential"], "/eu-west-3/kafka-cluster/") {
		t.Errorf("x-amz-credential %q, want the access key and region eu-west-3", req["x-amz-credential"])
	}
	if req["x-amz-security-token"] != "test-session-token" || req["x-amz-signature"] == "" {
		t.Errorf("security token %q, signature %q", req["x-amz-security-token"], req["x-amz-signature"])
	}
	if strings.Contains(string(b.last()), "test-secret-access-key") {
		t.Error("the secret key is sent")
	}
}

// TestMutualTLS: with kafka.tls.cert_file and key_file the relay presents its client certificate
// to a broker that requires one; without them the broker refuses the connection.
func TestMutualTLS(t *testing.T) {
	t.Parallel()
	certs := tlstest.New(t)
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "secure"), kfake.TLS(certs.MutualServer))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	cfg := kafka.Config{Brokers: c.ListenAddrs(), TopicTemplate: "secure",
		TLS: kafka.TLSConfig{Enabled: true, CAFile: certs.CAFile, CertFile: certs.ClientCertFile, KeyFile: certs.ClientKeyFile}}
	if err := publishOne(t, cfg); err != nil {
		t.Fatalf("publish with a client certificate: %v", err)
	}
	if key := readOne(t, cfg, "secure"); key != "u1" {
		t.Errorf("read back key %q, want u1", key)
	}
	anon := cfg
	anon.TLS.CertFile, anon.TLS.KeyFile = "", ""
	if err := publishOne(t, anon); err == nil {
		t.Error("a connection without a client certificate was accepted")
	}
}

// TestAuthConfigErrors: incomplete or contradictory cloud authentication settings are refused
// with the keys named, and no error shows a secret.
func TestAuthConfigErrors(t *testing.T) {
	t.Parallel()
	tlsOn := kafka.TLSConfig{Enabled: true}
	for _, c := range []struct {
		name string
		cfg  kafka.Config
		want string
	}{
		{"oauth without a source", kafka.Config{TLS: tlsOn, SASL: kafka.SASLConfig{Mechanism: "OAUTHBEARER"}}, "needs one of them"},
		{"oauth with both sources", kafka.Config{TLS: tlsOn, SASL: kafka.SASLConfig{Mechanism: "OAUTHBEARER",
			OAuth: kafka.OAuthConfig{TokenFile: "/t", TokenURL: "https://idp/token", ClientID: "a", ClientSecret: "Secret-1"}}}, "set one, not both"},
		{"oauth endpoint without a secret", kafka.Config{TLS: tlsOn, SASL: kafka.SASLConfig{Mechanism: "OAUTHBEARER",
			OAuth: kafka.OAuthConfig{TokenURL: "https://idp/token", ClientID: "a"}}}, "kafka.sasl.oauth.client_secret"},
		{"oauth endpoint over http", kafka.Config{TLS: tlsOn, SASL: kafka.SASLConfig{Mechanism: "OAUTHBEARER",
			OAuth: kafka.OAuthConfig{TokenURL: "http://idp.example.com/token", ClientID: "a", ClientSecret: "Secret-1"}}}, "use https"},
		{"oauth without TLS", kafka.Config{SASL: kafka.SASLConfig{Mechanism: "OAUTHBEARER", OAuth: kafka.OAuthConfig{TokenFile: "/t"}}}, "kafka.tls.enabled"},
		{"iam with a password", kafka.Config{TLS: tlsOn, SASL: kafka.SASLConfig{Mechanism: "AWS_MSK_IAM", Username: "u", Password: "Secret-1"}}, "not used by AWS_MSK_IAM"},
		{"token file without oauth", kafka.Config{SASL: kafka.SASLConfig{Mechanism: "SCRAM-SHA-256", Username: "u", Password: "Secret-1",
			OAuth: kafka.OAuthConfig{TokenFile: "/t"}}}, "only with kafka.sasl.mechanism=OAUTHBEARER"},
		{"unknown mechanism", kafka.Config{SASL: kafka.SASLConfig{Mechanism: "GSSAPI"}}, "OAUTHBEARER or AWS_MSK_IAM"},
	} {
		c.cfg.Brokers = []string{"127.0.0.1:9092"}
		err := c.cfg.WithDefaults().Validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error saying %q", c.name, err, c.want)
		} else if strings.Contains(err.Error(), "Secret-1") {
			t.Errorf("%s: the error shows a secret: %v", c.name, err)
		}
	}
}
