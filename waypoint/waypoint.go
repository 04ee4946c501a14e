package waypoint

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/veilmesh/veil/identity"
	"github.com/veilmesh/veil/policy"
	"github.com/veilmesh/veil/tunnel"
)

// Certs issues and holds the waypoint's own certificate and the trust bundle.
type Certs interface {
	identity.CertSource
	x509bundle.Source
}

// Options configure a Waypoint.
type Options struct {
	// Namespace and Name are the waypoint's Gateway; ServiceAccount its pods'.
	Namespace, Name, ServiceAccount string
	// PodIP is this waypoint pod's address: the source its forwarded connections carry.
	PodIP       netip.Addr
	TrustDomain spiffeid.TrustDomain
	Policy      policy.Options
	Certs       Certs
	// HBONEPort is the port dialled on endpoints. Default 15008.
	HBONEPort uint16
	// Dial opens the TCP connections of upstream tunnels and of plaintext endpoints.
	// Default a net.Dialer.
	Dial func(ctx context.Context, addr netip.AddrPort) (net.Conn, error)
	// Metrics receives the request metrics; nil records none.
	Metrics *Metrics
	Log     *slog.Logger
}

// Waypoint is veil's waypoint proxy: an HBONE server that takes the connections the node
// agents send it, judges each request with RequestAuthentication and HTTP-level
// AuthorizationPolicy (Router), and forwards it over HBONE with its own identity.
type Waypoint struct {
	opts   Options
	id     spiffeid.ID
	router *Router
	proxy  *Proxy
	server *tunnel.Server
	pool   *tunnel.Pool
}

// New builds a Waypoint; feed its Router with the config, then Serve.
func New(opts Options) (*Waypoint, error) {
	if opts.Namespace == "" || opts.Name == "" || opts.ServiceAccount == "" {
		return nil, errors.New("waypoint: namespace, name and service account are required")
	}
	if !opts.PodIP.IsValid() {
		return nil, errors.New("waypoint: the pod's address is required")
	}
	if opts.Certs == nil {
		return nil, errors.New("waypoint: Certs is required")
	}
	if opts.HBONEPort == 0 {
		opts.HBONEPort = 15008
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.Dial == nil {
		var d net.Dialer
		opts.Dial = func(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", addr.String())
		}
	}
	id, err := identity.NewID(opts.TrustDomain, opts.Namespace, opts.ServiceAccount)
	if err != nil {
		return nil, fmt.Errorf("waypoint: %w", err)
	}
	w := &Waypoint{opts: opts, id: id}
	w.router = &Router{Namespace: opts.Namespace, Name: opts.Name, TrustDomain: opts.TrustDomain, Policy: opts.Policy}
	w.pool = &tunnel.Pool{
		TLSConfig: func(ctx context.Context, k tunnel.Key) (*tls.Config, error) {
			c, err := opts.Certs.Get(ctx, k.Src)
			if err != nil {
				return nil, err
			}
			return identity.ClientConfig(c, k.Dst, opts.Certs), nil
		},
		Dial: func(ctx context.Context, _, addr string) (net.Conn, error) {
			ap, err := netip.ParseAddrPort(addr)
			if err != nil {
				return nil, err
			}
			return opts.Dial(ctx, ap)
		},
	}
	w.proxy = &Proxy{Dial: w.dialUpstream, Log: opts.Log, Metrics: opts.Metrics}
	local := func(net.Addr) (spiffeid.ID, bool) { return id, true }
	w.server = &tunnel.Server{
		TLSConfig: identity.ServerConfig(local, opts.Certs, opts.Certs),
		Handler:   streamHandler{w},
		// The authority is the original destination; Route decides which it serves.
		AnyDestination: true,
		Log:            opts.Log,
	}
	return w, nil
}

// Router is the waypoint's config sink (agent.ConfigSink).
func (w *Waypoint) Router() *Router { return w.router }

// ID is the waypoint's identity.
func (w *Waypoint) ID() spiffeid.ID { return w.id }

// Serve accepts HBONE connections on lis until Shutdown or Close.
func (w *Waypoint) Serve(lis net.Listener) error { return w.server.Serve(lis) }

// Shutdown stops accepting and waits for the open streams until ctx ends.
func (w *Waypoint) Shutdown(ctx context.Context) error {
	err := w.server.Shutdown(ctx)
	w.pool.Close()
	return err
}

// Close stops at once.
func (w *Waypoint) Close() error {
	err := w.server.Close()
	w.pool.Close()
	return err
}

// dialUpstream reaches an endpoint the router chose: over HBONE with the waypoint's own
// identity when the endpoint is in the mesh (its agent then applies its L4 policy to
// the waypoint's identity), else plain TCP.
func (w *Waypoint) dialUpstream(ctx context.Context, up Upstream) (net.Conn, error) {
	ep, ok := up.Key.(endpointKey)
	if !ok {
		return nil, errors.New("waypoint: upstream without an endpoint")
	}
	if !ep.Enrolled {
		return w.opts.Dial(ctx, ep.Addr)
	}
	addr := ep.Addr.Addr()
	key := tunnel.Key{Src: w.id, Dst: ep.ID, Addr: netip.AddrPortFrom(addr, w.opts.HBONEPort)}
	src := netip.AddrPortFrom(w.opts.PodIP, 0)
	st, err := w.pool.Open(ctx, key, tunnel.Target{Authority: ep.Addr, Source: src})
	if err != nil {
		return nil, err
	}
	return &upstreamConn{Stream: st, local: net.TCPAddrFromAddrPort(src), remote: net.TCPAddrFromAddrPort(ep.Addr)}, nil
}

// upstreamConn is an HBONE client stream as a net.Conn; it has no deadlines.
type upstreamConn struct {
	*tunnel.Stream
	local, remote net.Addr
}

func (c *upstreamConn) LocalAddr() net.Addr              { return c.local }
func (c *upstreamConn) RemoteAddr() net.Addr             { return c.remote }
func (c *upstreamConn) SetDeadline(time.Time) error      { return os.ErrNoDeadline }
func (c *upstreamConn) SetReadDeadline(time.Time) error  { return os.ErrNoDeadline }
func (c *upstreamConn) SetWriteDeadline(time.Time) error { return os.ErrNoDeadline }

// streamHandler routes each CONNECT and hands the accepted stream to the proxy: a
// destination not bound to this waypoint, or a source the peer does not own, is
// refused before any byte flows.
type streamHandler struct{ w *Waypoint }

func (h streamHandler) Connect(ctx context.Context, req *tunnel.Request) (net.Conn, error) {
	rt, err := h.w.router.Route(req)
	if err != nil {
		h.w.opts.Log.Info("waypoint: CONNECT refused", "peer", req.Peer.String(), "src", req.Source.String(), "dst", req.Destination.String(), "err", err)
		return nil, err
	}
	// The stream outlives Connect's context: it is served until it ends.
	return tunnel.Take(func(c net.Conn) { h.w.proxy.Serve(context.WithoutCancel(ctx), c, rt) }), nil
}
