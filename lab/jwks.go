package lab

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jwt"
)

// The lab's token issuer: a JWKS server on the fabric, beside the controller, serving
// the public half of a key the lab generates at `lab up`; tokens are signed with it.
const (
	JWKSPort  = "8088"
	labKeyID  = "veil-lab-1"
	jwksDir   = "jwks"
	jwksFile  = "jwks.json"
	jwtKeyPEM = "key.pem"
)

// Issuer is the lab's token issuer (iss), and JWKSURI where its keys are served.
func (l *Lab) Issuer() string { return "https://issuer.veil.lab" }

// JWKSURI is the address of the lab's JWKS.
func (l *Lab) JWKSURI() string {
	return "http://" + net.JoinHostPort(l.Spec.controllerIP().String(), JWKSPort) + "/" + jwksFile
}

// writeJWKS generates the lab's signing key and writes it with its public JWKS.
func (l *Lab) writeJWKS() error {
	if err := os.MkdirAll(l.path(jwksDir), 0o700); err != nil {
		return err
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(l.path(jwksDir, jwtKeyPEM), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return err
	}
	pub, err := jwk.FromRaw(key.Public())
	if err != nil {
		return err
	}
	pub.Set(jwk.KeyIDKey, labKeyID)
	pub.Set(jwk.AlgorithmKey, jwa.RS256)
	pub.Set(jwk.KeyUsageKey, "sig")
	set := jwk.NewSet()
	set.AddKey(pub)
	b, err := json.Marshal(set)
	if err != nil {
		return err
	}
	return os.WriteFile(l.path(jwksDir, jwksFile), b, 0o644)
}

// startJWKS runs the JWKS server on the fabric and waits until it answers.
func (l *Lab) startJWKS(ctx context.Context) error {
	addr := net.JoinHostPort(l.Spec.controllerIP().String(), JWKSPort)
	if err := l.start("jwks", l.fabricNS(), l.bin("veilctl"), "lab", "jwks", "--listen", addr, "--file", l.path(jwksDir, jwksFile)); err != nil {
		return err
	}
	return l.waitFor(ctx, "the JWKS server", func(ctx context.Context) error {
		c, err := dialIn(ctx, l.fabricNS(), addr)
		if err == nil {
			c.Close()
		}
		return err
	}, "jwks")
}

// ServeJWKS serves file at /<its name>, and an OpenID configuration naming it, on addr
// until ctx ends: the lab's token issuer.
func ServeJWKS(ctx context.Context, addr, file string) error {
	if addr == "" || file == "" {
		return errors.New("lab jwks: --listen and --file are required")
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("lab jwks: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/"+jwksFile, func(w http.ResponseWriter, r *http.Request) {
		b, err := os.ReadFile(file)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(b)
	})
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"issuer":"https://issuer.veil.lab","jwks_uri":"http://%s/%s"}`, addr, jwksFile)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { <-ctx.Done(); srv.Close() }()
	if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// TokenOptions shape a lab token.
type TokenOptions struct {
	Subject   string
	Audience  []string
	ExpiresIn time.Duration // negative: already expired
	// Tamper flips a byte of the signature: a token with a bad signature.
	Tamper bool
	Claims map[string]any
}

// Token mints a JWT of the lab's issuer, signed with the lab's key (RS256).
func (l *Lab) Token(o TokenOptions) (string, error) {
	b, err := os.ReadFile(l.path(jwksDir, jwtKeyPEM))
	if err != nil {
		return "", err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return "", errors.New("lab: token key: not PEM")
	}
	raw, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return "", err
	}
	key, err := jwk.FromRaw(raw)
	if err != nil {
		return "", err
	}
	key.Set(jwk.KeyIDKey, labKeyID)
	now := time.Now()
	if o.ExpiresIn == 0 {
		o.ExpiresIn = time.Hour
	}
	tb := jwt.NewBuilder().Issuer(l.Issuer()).Subject(o.Subject).IssuedAt(now.Add(-time.Minute)).
		Expiration(now.Add(o.ExpiresIn))
	if len(o.Audience) > 0 {
		tb = tb.Audience(o.Audience)
	}
	for k, v := range o.Claims {
		tb = tb.Claim(k, v)
	}
	tok, err := tb.Build()
	if err != nil {
		return "", err
	}
	signed, err := jwt.Sign(tok, jwt.WithKey(jwa.RS256, key))
	if err != nil {
		return "", err
	}
	if o.Tamper {
		// Another base64url letter in the signature: well formed, wrongly signed.
		if i := len(signed) - 5; signed[i] == 'A' {
			signed[i] = 'B'
		} else {
			signed[i] = 'A'
		}
	}
	return string(signed), nil
}
