package tunnel

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
)

// A pooled connection takes no new stream once a certificate of its handshake has
// expired: the next stream opens a connection with the certificates in force (renewed
// meanwhile); the streams of the old connection go on, and it closes after the last.
func TestPoolRetiresConnectionWhenCertificateExpires(t *testing.T) {
	ca, err := identity.NewSelfSignedCA(identity.CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const life = 2 * time.Second
	mgr, err := identity.NewManager(identity.ManagerOptions{Issuer: ca, TTL: life, Jitter: -1, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mgr.Close() })
	bundle := x509bundle.NewSet(x509bundle.FromX509Authorities(ca.TrustDomain(), ca.Roots()))
	hb := startServer(t, identity.ServerConfig(func(net.Addr) (spiffeid.ID, bool) { return reviews, true }, mgr, bundle), nil)
	app := upstream(t, echo)
	p := &Pool{TLSConfig: func(ctx context.Context, k Key) (*tls.Config, error) {
		c, err := mgr.Get(ctx, k.Src)
		if err != nil {
			return nil, err
		}
		return identity.ClientConfig(c, k.Dst, bundle), nil
	}}
	t.Cleanup(func() { p.Close() })
	k := Key{Src: frontend, Dst: reviews, Addr: hb.addr}
	ctx := context.Background()
	if _, err := mgr.Get(ctx, reviews); err != nil {
		t.Fatal(err)
	}
	held, other := connect(t, p, k, app), connect(t, p, k, app)
	if n := p.Conns(k); n != 1 {
		t.Fatalf("%d connections before expiry, want 1", n)
	}
	time.Sleep(life + 100*time.Millisecond)
	connect(t, p, k, app)
	if n := p.Conns(k); n != 2 {
		t.Fatalf("%d connections after the first one's certificates expired, want 2 (the old one still carries a stream)", n)
	}
	fmt.Fprint(held, "still here")
	held.CloseWrite()
	if b, err := io.ReadAll(held); string(b) != "still here" {
		t.Fatalf("the stream opened before expiry: %q, %v", b, err)
	}
	held.Close()
	other.Close()
	// Its last stream ended, the retired connection closes (not after IdleTimeout).
	eventually(t, "the retired connection to close", func() bool { return p.Conns(k) == 1 })
}
