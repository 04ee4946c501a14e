package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"
)

// ServeApp is the lab's application, run in every pod: an HTTP server on each address
// that answers any request with who it is and who it sees, which shows whether the
// mesh kept the client's address. It blocks until ctx ends.
func ServeApp(ctx context.Context, name string, addrs []string) error {
	if len(addrs) == 0 {
		return errors.New("lab app: no --listen address")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, len(addrs))
	for _, addr := range addrs {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("lab app: %w", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		srv := &http.Server{
			ReadHeaderTimeout: 10 * time.Second,
			Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				host, _, _ := net.SplitHostPort(r.RemoteAddr)
				fmt.Fprintf(w, "hello from %s port %d; you are %s\n", name, port, host)
			}),
		}
		wg.Add(2)
		go func() { defer wg.Done(); <-ctx.Done(); srv.Close() }()
		go func() {
			defer wg.Done()
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- err
				cancel() // one port down takes the application down, visibly
			}
		}()
	}
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}
