package kafka

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/twmb/franz-go/pkg/sasl"
	"github.com/twmb/franz-go/pkg/sasl/aws"
	"github.com/twmb/franz-go/pkg/sasl/oauth"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"
)

// SASL mechanisms of SASLConfig.Mechanism.
const (
	MechanismPlain       = "PLAIN"
	MechanismScram256    = "SCRAM-SHA-256"
	MechanismScram512    = "SCRAM-SHA-512"
	MechanismOAuthBearer = "OAUTHBEARER"
	MechanismAWSMSKIAM   = "AWS_MSK_IAM"
)

// OAuthConfig says where the OAUTHBEARER mechanism gets its token: from TokenFile, or from the
// OAuth 2.0 client-credentials grant at TokenURL. Set one of the two.
type OAuthConfig struct {
	// TokenFile holds the token (surrounding white space ignored). It is read at every
	// authentication, so a token a sidecar or the platform rewrites is used from the next one on.
	TokenFile string
	// TokenURL is the token endpoint of the client-credentials grant (RFC 6749, 4.4); https,
	// or http to a loopback address only.
	TokenURL string
	// ClientID and ClientSecret authenticate the relay to TokenURL (HTTP Basic).
	ClientID     string
	ClientSecret string // a secret: never logged
	// Scope is the space-separated scope asked for; none when empty.
	Scope string
	// Extensions are SASL extensions sent with the token (Confluent Cloud's logicalCluster and
	// identityPoolId, for instance).
	Extensions map[string]string
}

// validate reports what is wrong with the OAUTHBEARER settings.
func (o OAuthConfig) validate() []error {
	var errs []error
	switch {
	case o.TokenFile == "" && o.TokenURL == "":
		errs = append(errs, errors.New("kafka.sasl.oauth.token_file, kafka.sasl.oauth.token_url: OAUTHBEARER needs one of them"))
	case o.TokenFile != "" && o.TokenURL != "":
		errs = append(errs, errors.New("kafka.sasl.oauth.token_file, kafka.sasl.oauth.token_url: set one, not both"))
	case o.TokenURL != "":
		u, err := url.Parse(o.TokenURL)
		switch {
		case err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http"):
			errs = append(errs, fmt.Errorf("kafka.sasl.oauth.token_url: %q is not an http(s) URL", o.TokenURL))
		case u.Scheme == "http" && !loopback(u.Hostname()):
			errs = append(errs, errors.New("kafka.sasl.oauth.token_url: http sends the client secret in clear text; use https"))
		}
		if o.ClientID == "" || o.ClientSecret == "" {
			errs = append(errs, errors.New("kafka.sasl.oauth.client_id, kafka.sasl.oauth.client_secret: both are required with kafka.sasl.oauth.token_url"))
		}
	}
	if o.TokenFile != "" && (o.ClientID != "" || o.ClientSecret != "" || o.Scope != "") {
		errs = append(errs, errors.New("kafka.sasl.oauth.client_id, client_secret, scope: they go with kafka.sasl.oauth.token_url, not token_file"))
	}
	return errs
}

// loopback reports whether host is localhost or a loopback address.
func loopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// mechanism returns the SASL mechanism of s, nil for none.
func (s SASLConfig) mechanism() (sasl.Mechanism, error) {
	switch strings.ToUpper(s.Mechanism) {
	case MechanismPlain:
		return plain.Auth{User: s.Username, Pass: s.Password}.AsMechanism(), nil
	case MechanismScram256:
		return scram.Auth{User: s.Username, Pass: s.Password}.AsSha256Mechanism(), nil
	case MechanismScram512:
		return scram.Auth{User: s.Username, Pass: s.Password}.AsSha512Mechanism(), nil
	case MechanismOAuthBearer:
		src := s.OAuth.source()
		return oauth.Oauth(func(ctx context.Context) (oauth.Auth, error) {
			tok, err := src(ctx)
			if err != nil {
				s.tokenFailed(err)
				return oauth.Auth{}, err
			}
			return oauth.Auth{Token: tok, Extensions: s.OAuth.Extensions}, nil
		}), nil
	case MechanismAWSMSKIAM:
		// The standard chain: environment, shared files (AWS_PROFILE), web identity (EKS), ECS
		// and EC2 instance roles; the provider caches and renews what it gets.
		cfg, err := awsconfig.LoadDefaultConfig(context.Background())
		if err != nil {
			return nil, fmt.Errorf("kafka.sasl.mechanism=AWS_MSK_IAM: AWS configuration: %w", err)
		}
		creds := cfg.Credentials
		return aws.ManagedStreamingIAM(func(ctx context.Context) (aws.Auth, error) {
			if creds == nil {
				err := errors.New("AWS_MSK_IAM: no AWS credentials found (environment, shared files, web identity, ECS or EC2 role)")
				s.tokenFailed(err)
				return aws.Auth{}, err
			}
			c, err := creds.Retrieve(ctx)
			if err != nil {
				err = fmt.Errorf("AWS_MSK_IAM: AWS credentials: %w", err)
				s.tokenFailed(err)
				return aws.Auth{}, err
			}
			return aws.Auth{AccessKey: c.AccessKeyID, SecretKey: c.SecretAccessKey, SessionToken: c.SessionToken}, nil
		}), nil
	}
	return nil, nil
}

// tokenFailed tells OnTokenError, if set, that a token or credentials could not be had.
func (s SASLConfig) tokenFailed(err error) {
	if s.OnTokenError != nil {
		s.OnTokenError(err)
	}
}

// source returns the function that gives the OAUTHBEARER token at each authentication.
func (o OAuthConfig) source() func(context.Context) (string, error) {
	if o.TokenFile != "" {
		return func(context.Context) (string, error) {
			b, err := os.ReadFile(o.TokenFile)
			if err != nil {
				return "", fmt.Errorf("kafka.sasl.oauth.token_file: %w", err)
			}
			tok := strings.TrimSpace(string(b))
			if tok == "" {
				return "", fmt.Errorf("kafka.sasl.oauth.token_file: %s is empty", o.TokenFile)
			}
			return tok, nil
		}
	}
	c := &clientCredentials{cfg: o, http: &http.Client{Timeout: 30 * time.Second}}
	return c.token
}

// clientCredentials gets tokens with the client-credentials grant and keeps each until shortly
// before it expires.
type clientCredentials struct {
	cfg  OAuthConfig
	http *http.Client

	mu      sync.Mutex
	tok     string
	expires time.Time
}

// tokenRefreshMargin is how long before its expiry a token is replaced.
const tokenRefreshMargin = 30 * time.Second

// token returns a valid token, asking the endpoint for a new one when the last expires soon.
func (c *clientCredentials) token(ctx context.Context) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.tok != "" && time.Now().Before(c.expires) {
		return c.tok, nil
	}
	form := url.Values{"grant_type": {"client_credentials"}}
	if c.cfg.Scope != "" {
		form.Set("scope", c.cfg.Scope)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.cfg.TokenURL, strings.NewReader(form.Encode()))
	if err != nil {
		return "", fmt.Errorf("kafka.sasl.oauth.token_url: %w", err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	req.SetBasicAuth(url.QueryEscape(c.cfg.ClientID), url.QueryEscape(c.cfg.ClientSecret))
	resp, err := c.http.Do(req)
	if err != nil {
		return "", fmt.Errorf("oauth token endpoint: %w", err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", fmt.Errorf("oauth token endpoint: %w", err)
	}
	var out struct {
		AccessToken string      `json:"access_token"`
		ExpiresIn   json.Number `json:"expires_in"`
		Error       string      `json:"error"`
		Description string      `json:"error_description"`
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	jerr := dec.Decode(&out)
	switch {
	case resp.StatusCode != http.StatusOK:
		// The endpoint's error code and description: never the request, which holds the secret.
		return "", fmt.Errorf("oauth token endpoint %s: %s: %s %s", c.cfg.TokenURL, resp.Status, truncate(out.Error, 200), truncate(out.Description, 500))
	case jerr != nil || out.AccessToken == "":
		return "", fmt.Errorf("oauth token endpoint %s: the answer has no access_token", c.cfg.TokenURL)
	}
	c.tok, c.expires = out.AccessToken, time.Now().Add(time.Hour) // no expires_in: an hour
	if secs, err := out.ExpiresIn.Float64(); err == nil && secs > 0 {
		life := time.Duration(secs * float64(time.Second))
		c.expires = time.Now().Add(max(life-tokenRefreshMargin, life/2))
	}
	return c.tok, nil
}
