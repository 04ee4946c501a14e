package waypoint

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/veilmesh/veil/tunnel"
)

// h1Server serves the HTTP/1.1 requests of one stream, one at a time (pipelined
// requests wait in br).
type h1Server struct {
	s  *session
	br *bufio.Reader
	bw *bufio.Writer
	w  *watchdog
	// long collects a header line longer than br's buffer.
	long []byte
	// detached: another goroutine may still read br (an upstream HTTP/2 client sending a
	// request body it did not finish): br is not pooled.
	detached bool
	// clientEnded: the client ended its side (EOF where a request would start).
	clientEnded bool
	remote      string
}

// refusal is a request the proxy answers itself and then closes the connection: 400,
// 426, 431, ... A zero status closes without an answer (EOF, timeout).
type refusal struct {
	status int
	reason string
}

func refuse(status int, reason string) *refusal { return &refusal{status: status, reason: reason} }

var errHeaderTooLarge = errors.New("header too large")
var errBadLine = errors.New("line not ended by CRLF")

func (h *h1Server) serve() {
	defer h.finish()
	h.remote = h.s.c.RemoteAddr().String()
	for {
		h.w.arm(h.s.p.IdleTimeout)
		if _, err := h.br.Peek(1); err != nil {
			h.clientEnded = err == io.EOF
			return
		}
		h.w.arm(h.s.p.ReadHeaderTimeout)
		r, hd, ref := h.readRequest()
		if ref != nil {
			if ref.status != 0 {
				h.s.logRefusal(ref.status, ref.reason)
				h.s.stats.record(h.s.rt.Labels, nil, "http", ref.status, "-", "", 0)
				h.writeLocal(&Response{Status: ref.status, Body: http.StatusText(ref.status)}, true, "")
			}
			return
		}
		h.w.stop()
		if !h.exchange(r, hd) {
			return
		}
	}
}

// Lingering close: how long and how much the proxy reads, after ending its side, while
// it waits for the client to end its own (net/http waits 500 ms too).
const (
	lingerTime  = 500 * time.Millisecond
	lingerBytes = 256 << 10
)

// finish ends the stream gracefully: what is buffered is sent, then a FIN (END_STREAM).
// When the proxy ends first, it reads and drops what the client still sends until the
// client ends too (bounded): closing with unread bytes would reset the stream, and a
// reset loses the response the client has not read yet.
func (h *h1Server) finish() {
	h.w.stop()
	if h.bw.Flush() == nil {
		if cw, ok := h.s.c.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil && !h.clientEnded && !h.detached {
			h.w.arm(lingerTime)
			io.CopyN(io.Discard, h.br, lingerBytes)
			h.w.stop()
		}
	}
	putWriter(h.bw)
	if !h.detached {
		putReader(h.br)
	}
}

// h1Head is what the request's header says beyond the http.Request.
type h1Head struct {
	upgrade string // the Upgrade of a websocket upgrade request
	expect  bool   // Expect: 100-continue
}

// readLine reads one header line without its CRLF, counting its bytes against max. The
// line is valid until the next read.
func (h *h1Server) readLine(total *int, max int) ([]byte, error) {
	if cap(h.long) > ioBuf {
		h.long = nil // a long line's buffer is not kept for the stream's life
	}
	h.long = h.long[:0]
	for {
		l, err := h.br.ReadSlice('\n')
		*total += len(l)
		if *total > max {
			return nil, errHeaderTooLarge
		}
		if err == bufio.ErrBufferFull {
			h.long = append(h.long, l...)
			continue
		}
		if err != nil {
			return nil, err
		}
		if len(h.long) > 0 {
			h.long = append(h.long, l...)
			l = h.long
		}
		if len(l) < 2 || l[len(l)-2] != '\r' {
			return nil, errBadLine
		}
		l = l[:len(l)-2]
		if bytes.IndexByte(l, '\r') >= 0 {
			return nil, errBadLine
		}
		return l, nil
	}
}

func lineRefusal(err error, total int) *refusal {
	switch {
	case errors.Is(err, errHeaderTooLarge):
		return refuse(http.StatusRequestHeaderFieldsTooLarge, "header over the size limit")
	case errors.Is(err, errBadLine):
		return refuse(http.StatusBadRequest, err.Error())
	case errors.Is(err, io.EOF) && total > 0:
		return &refusal{reason: "incomplete header"}
	}
	return &refusal{reason: err.Error()}
}

// readRequest reads and checks one request's header. It refuses what a smuggling proxy
// chain could read two ways: Content-Length with Transfer-Encoding, a Transfer-Encoding
// other than chunked, differing Content-Lengths, obs-fold, bare LF, whitespace before a
// colon; and h2c upgrades, HTTP/1.0 (426, as Envoy without accept_http_10) and
// non-origin forms.
func (h *h1Server) readRequest() (*http.Request, *h1Head, *refusal) {
	p := h.s.p
	total := 0
	var line []byte
	var err error
	for skipped := 0; ; skipped++ {
		if line, err = h.readLine(&total, p.MaxHeaderBytes); err != nil {
			return nil, nil, lineRefusal(err, total)
		}
		if len(line) > 0 {
			break
		}
		if skipped == 3 {
			return nil, nil, refuse(http.StatusBadRequest, "empty lines instead of a request")
		}
	}
	m, rest, ok1 := bytes.Cut(line, []byte(" "))
	target, version, ok2 := bytes.Cut(rest, []byte(" "))
	if !ok1 || !ok2 || !isToken(m) || len(target) == 0 {
		return nil, nil, refuse(http.StatusBadRequest, "malformed request line")
	}
	switch string(version) {
	case "HTTP/1.1":
	case "HTTP/1.0":
		return nil, nil, refuse(http.StatusUpgradeRequired, "HTTP/1.0")
	default:
		return nil, nil, refuse(http.StatusBadRequest, "malformed request line: version")
	}
	for _, c := range target {
		if c <= ' ' || c == 0x7f {
			return nil, nil, refuse(http.StatusBadRequest, "malformed request target")
		}
	}
	method := internMethod(m)
	rawTarget := string(target)

	hdr := make(http.Header, 8)
	var (
		hd       h1Head
		count    int
		cl       string
		hasCL    bool
		te       []string
		hosts    int
		host     string
		conn     []string
		upgrades []string
		expect   string
	)
	for {
		if line, err = h.readLine(&total, p.MaxHeaderBytes); err != nil {
			return nil, nil, lineRefusal(err, total)
		}
		if len(line) == 0 {
			break
		}
		if count++; count > p.MaxHeaderCount {
			return nil, nil, refuse(http.StatusRequestHeaderFieldsTooLarge, "too many header lines")
		}
		if line[0] == ' ' || line[0] == '\t' {
			return nil, nil, refuse(http.StatusBadRequest, "obs-fold header line")
		}
		i := bytes.IndexByte(line, ':')
		if i <= 0 || !isToken(line[:i]) {
			return nil, nil, refuse(http.StatusBadRequest, "malformed header line")
		}
		value := trimOWSBytes(line[i+1:])
		for _, c := range value {
			if c < ' ' && c != '\t' || c == 0x7f {
				return nil, nil, refuse(http.StatusBadRequest, "control byte in a header value")
			}
		}
		key := canonicalKey(line[:i])
		v := string(value)
		switch key {
		case "Content-Length":
			for _, e := range splitTokens(v) {
				if e == "" || len(e) > 18 || strings.Trim(e, "0123456789") != "" {
					return nil, nil, refuse(http.StatusBadRequest, "malformed Content-Length")
				}
				if hasCL && e != cl {
					return nil, nil, refuse(http.StatusBadRequest, "differing Content-Lengths")
				}
				cl, hasCL = e, true
			}
		case "Transfer-Encoding":
			te = append(te, splitTokens(v)...)
		case "Host":
			hosts++
			host = v
		case "Connection":
			conn = append(conn, splitTokens(v)...)
		case "Upgrade":
			upgrades = append(upgrades, splitTokens(v)...)
		case "Http2-Settings":
			return nil, nil, refuse(http.StatusBadRequest, "HTTP2-Settings: h2c upgrade")
		case "Expect":
			expect = v
		case "Keep-Alive", "Proxy-Connection":
		default:
			hdr[key] = append(hdr[key], v)
		}
	}

	contentLength := int64(0)
	chunked := false
	if len(te) > 0 {
		if hasCL {
			return nil, nil, refuse(http.StatusBadRequest, "Content-Length with Transfer-Encoding")
		}
		if len(te) != 1 || !httpEqualFold(te[0], "chunked") {
			return nil, nil, refuse(http.StatusBadRequest, "Transfer-Encoding other than chunked")
		}
		chunked, contentLength = true, -1
	} else if hasCL {
		contentLength, _ = strconv.ParseInt(cl, 10, 64)
		hdr["Content-Length"] = []string{cl}
	}
	for _, u := range upgrades {
		if httpEqualFold(u, "h2c") {
			return nil, nil, refuse(http.StatusBadRequest, "Upgrade: h2c")
		}
	}
	if hosts != 1 {
		return nil, nil, refuse(http.StatusBadRequest, "no single Host")
	}
	closeConn := false
	for _, tok := range conn {
		switch {
		case httpEqualFold(tok, "close"):
			closeConn = true
		case httpEqualFold(tok, "upgrade"):
			if len(upgrades) > 0 {
				hd.upgrade = strings.Join(upgrades, ", ")
			}
		case tok == "" || httpEqualFold(tok, "keep-alive") || httpEqualFold(tok, "te"):
		default:
			delete(hdr, http.CanonicalHeaderKey(tok))
		}
	}
	if te := hdr["Te"]; te != nil {
		delete(hdr, "Te")
		if hasToken(te, "trailers") {
			hdr["Te"] = []string{"trailers"}
		}
	}
	if expect != "" {
		if !httpEqualFold(expect, "100-continue") {
			return nil, nil, refuse(http.StatusExpectationFailed, "Expect other than 100-continue")
		}
		hd.expect = true
	}
	if method == http.MethodConnect {
		// Envoy's answer to an upgrade it is not configured for.
		return nil, nil, refuse(http.StatusForbidden, "CONNECT")
	}
	if hd.upgrade != "" && !httpEqualFold(upgrades[0], "websocket") {
		return nil, nil, refuse(http.StatusForbidden, "Upgrade other than websocket")
	}

	// The request-target: origin-form, or absolute-form (its authority is the host).
	path := rawTarget
	if path[0] != '/' {
		scheme, rest, ok := strings.Cut(path, "://")
		if !ok || !(httpEqualFold(scheme, "http") || httpEqualFold(scheme, "https")) {
			return nil, nil, refuse(http.StatusBadRequest, "request target not in origin form")
		}
		end := strings.IndexAny(rest, "/?")
		if end < 0 {
			end = len(rest)
		}
		host, path = rest[:end], rest[end:]
		if path == "" || path[0] == '?' {
			path = "/" + path
		}
	}
	if host == "" || !httpguts.ValidHostHeader(host) {
		return nil, nil, refuse(http.StatusBadRequest, "invalid Host")
	}
	u, uri, err := normalizeTarget(path)
	if err != nil {
		return nil, nil, refuse(http.StatusBadRequest, err.Error())
	}
	r := &http.Request{
		Method:        method,
		URL:           u,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        hdr,
		Host:          host,
		RequestURI:    uri,
		RemoteAddr:    h.remote,
		ContentLength: contentLength,
		Close:         closeConn,
		Body:          http.NoBody,
	}
	if chunked {
		r.TransferEncoding = []string{"chunked"}
		r.Trailer = http.Header{}
		r.Body = &h1Body{h: h, chunked: true, trailer: r.Trailer}
	} else if contentLength > 0 {
		r.Body = &h1Body{h: h, remaining: contentLength}
	}
	return r.WithContext(h.s.ctx), &hd, nil
}

// normalizeTarget normalizes an origin-form request-target: the URL Decide sees and the
// request-URI forwarded.
func normalizeTarget(target string) (*url.URL, string, error) {
	path, query, hasQuery := strings.Cut(target, "?")
	if strings.IndexByte(query, '#') >= 0 {
		return nil, "", errorf("fragment in the request target")
	}
	norm, err := NormalizePath(path)
	if err != nil {
		return nil, "", err
	}
	u := &url.URL{Path: norm, RawPath: norm, RawQuery: query, ForceQuery: hasQuery && query == ""}
	if strings.IndexByte(norm, '%') >= 0 {
		if u.Path, err = url.PathUnescape(norm); err != nil {
			return nil, "", err
		}
	}
	uri := norm
	if hasQuery {
		uri = norm + "?" + query
	}
	return u, uri, nil
}

// exchange answers one request: Decide, then a local reply or the upstream's response.
// It reports whether the connection goes on.
func (h *h1Server) exchange(r *http.Request, hd *h1Head) bool {
	s := h.s
	start := time.Now()
	up, reply := s.decide(r)
	if reply != nil {
		keep := !r.Close && h.discardBody(r, hd)
		s.stats.record(s.rt.Labels, nil, requestProtocol(r), reply.Status, reply.Flags, "", time.Since(start))
		h.writeLocal(reply, !keep, r.Method)
		return keep
	}
	if hd.upgrade != "" {
		return h.upgrade(r, up, hd, start)
	}
	if hd.expect {
		h.bw.WriteString("HTTP/1.1 100 Continue\r\n\r\n")
		if h.bw.Flush() != nil {
			return false
		}
	}
	resp, ul, err := s.roundTrip(r, up)
	if err != nil {
		reply := upstreamFailure(err)
		s.logUpstream(up, err)
		keep := !r.Close && bodyDone(r)
		h.writeLocal(reply, !keep, r.Method)
		h.endUpload(r, ul, keep)
		s.stats.record(s.rt.Labels, up.Workload, requestProtocol(r), reply.Status, reply.Flags, "", time.Since(start))
		return keep
	}
	ok := h.writeResponse(r, resp)
	keep := ok && !r.Close && bodyDone(r)
	h.endUpload(r, ul, keep)
	flags := "-"
	if !ok {
		flags = "UPE" // the upstream's response ended early
	}
	s.stats.record(s.rt.Labels, up.Workload, requestProtocol(r), resp.StatusCode, flags, grpcStatus(resp), time.Since(start))
	return keep
}

// endUpload waits for the goroutine of ours that sends the request body upstream. When
// the exchange ends before the body does, the connection is closed first: that ends the
// goroutine's wait for the client.
func (h *h1Server) endUpload(r *http.Request, ul *upload, keep bool) {
	if !keep && !bodyDone(r) {
		h.s.c.Close()
		if ul == nil {
			// An HTTP/2 upstream client may still be reading the body from br.
			h.detached = true
		}
	}
	if ul != nil {
		ul.wait()
	}
}

// discardBody reads the body of a request answered locally, so that the connection can
// take the next one; false when it cannot (a client waiting for 100-continue, a body
// over 64 KiB, or one that fails).
func (h *h1Server) discardBody(r *http.Request, hd *h1Head) bool {
	if r.Body == http.NoBody {
		return true
	}
	if hd.expect || r.ContentLength < 0 || r.ContentLength > 64<<10 {
		return false
	}
	h.w.arm(h.s.p.ReadHeaderTimeout)
	defer h.w.stop()
	_, err := io.Copy(io.Discard, r.Body)
	return err == nil
}

func bodyDone(r *http.Request) bool {
	b, ok := r.Body.(*h1Body)
	return !ok || b.done.Load()
}

// writeLocal writes a local reply as Envoy's HTTP/1 codec does: lower-case names, the
// reply's headers, content-length, content-type, date, then the body (none for HEAD).
func (h *h1Server) writeLocal(reply *Response, closeConn bool, method string) error {
	bw := h.bw
	writeStatusLine(bw, reply.Status)
	keys := make([]string, 0, len(reply.Header))
	for k := range reply.Header {
		if httpguts.ValidHeaderFieldName(k) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	hasType := false
	for _, k := range keys {
		lk := strings.ToLower(k)
		switch lk {
		case "content-length", "connection", "transfer-encoding", "date":
			continue
		case "content-type":
			hasType = true
		}
		for _, v := range reply.Header[k] {
			if httpguts.ValidHeaderFieldValue(v) {
				bw.WriteString(lk)
				bw.WriteString(": ")
				bw.WriteString(v)
				bw.WriteString("\r\n")
			}
		}
	}
	bw.WriteString("content-length: ")
	bw.Write(strconv.AppendInt(bw.AvailableBuffer(), int64(len(reply.Body)), 10))
	bw.WriteString("\r\n")
	if !hasType {
		bw.WriteString("content-type: text/plain\r\n")
	}
	bw.WriteString("date: ")
	bw.Write(h.s.p.now().UTC().AppendFormat(bw.AvailableBuffer(), http.TimeFormat))
	bw.WriteString("\r\n")
	if closeConn {
		bw.WriteString("connection: close\r\n")
	}
	bw.WriteString("\r\n")
	if method != http.MethodHead {
		bw.WriteString(reply.Body)
	}
	return bw.Flush()
}

func writeStatusLine(bw *bufio.Writer, code int) {
	bw.WriteString("HTTP/1.1 ")
	bw.Write(strconv.AppendInt(bw.AvailableBuffer(), int64(code), 10))
	bw.WriteByte(' ')
	bw.WriteString(http.StatusText(code))
	bw.WriteString("\r\n")
}

// writeResponse streams an upstream response to the client; false when it could not be
// sent whole (the connection is then closed: the client sees it cut short).
func (h *h1Server) writeResponse(r *http.Request, resp *http.Response) bool {
	defer resp.Body.Close()
	bw := h.bw
	code := resp.StatusCode
	writeStatusLine(bw, code)
	skip := responseSkip(resp.Header)
	for k, vv := range resp.Header {
		if skip(k) {
			continue
		}
		for _, v := range vv {
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(v)
			bw.WriteString("\r\n")
		}
	}
	bodyless := r.Method == http.MethodHead || code == http.StatusNoContent || code == http.StatusNotModified || code < 200
	chunked := false
	switch {
	case bodyless:
		if cl := resp.Header["Content-Length"]; r.Method == http.MethodHead && len(cl) > 0 {
			bw.WriteString("Content-Length: ")
			bw.WriteString(cl[0])
			bw.WriteString("\r\n")
		}
	case resp.ContentLength >= 0:
		bw.WriteString("Content-Length: ")
		bw.Write(strconv.AppendInt(bw.AvailableBuffer(), resp.ContentLength, 10))
		bw.WriteString("\r\n")
	default:
		chunked = true
		bw.WriteString("Transfer-Encoding: chunked\r\n")
		if len(resp.Trailer) > 0 {
			bw.WriteString("Trailer: ")
			first := true
			for k := range resp.Trailer {
				if !first {
					bw.WriteString(", ")
				}
				first = false
				bw.WriteString(k)
			}
			bw.WriteString("\r\n")
		}
	}
	if r.Close {
		bw.WriteString("Connection: close\r\n")
	}
	bw.WriteString("\r\n")
	if bodyless {
		return bw.Flush() == nil
	}
	bp := copyPool.Get().(*[]byte)
	defer copyPool.Put(bp)
	buf := *bp
	pb, _ := resp.Body.(pending)
	var n64 int64
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			n64 += int64(n)
			if chunked {
				bw.Write(strconv.AppendInt(bw.AvailableBuffer(), int64(n), 16))
				bw.WriteString("\r\n")
				bw.Write(buf[:n])
				bw.WriteString("\r\n")
			} else if _, werr := bw.Write(buf[:n]); werr != nil {
				return false
			}
			if pb == nil || pb.wouldBlock() {
				if bw.Flush() != nil {
					return false
				}
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return false
		}
	}
	if resp.ContentLength >= 0 && n64 != resp.ContentLength {
		return false
	}
	if chunked {
		writeLastChunk(bw, resp.Trailer)
	}
	return bw.Flush() == nil
}

// responseSkip returns which of a response's headers a proxy does not forward as they
// are: hop-by-hop ones, those Connection names, and the framing it writes itself.
func responseSkip(h http.Header) func(string) bool {
	named := h["Connection"]
	return func(k string) bool {
		switch k {
		case "Connection", "Proxy-Connection", "Keep-Alive", "Te", "Transfer-Encoding", "Upgrade", "Trailer", "Content-Length":
			return true
		}
		for _, v := range named {
			for _, tok := range splitTokens(v) {
				if httpEqualFold(tok, k) {
					return true
				}
			}
		}
		return false
	}
}

// upgrade forwards a websocket upgrade, as Envoy's websocket upgrade config: the
// request goes on a fresh upstream connection; after a 101 the two connections are
// spliced until both end.
func (h *h1Server) upgrade(r *http.Request, up Upstream, hd *h1Head, start time.Time) bool {
	s := h.s
	if s.upstream != ProtocolHTTP1 || r.Body != http.NoBody {
		reply := &Response{Status: http.StatusForbidden}
		h.writeLocal(reply, false, r.Method)
		s.stats.record(s.rt.Labels, up.Workload, "http", reply.Status, "-", "", time.Since(start))
		return !r.Close && r.Body == http.NoBody
	}
	uc, err := s.newH1Conn(up)
	if err == nil {
		err = uc.writeHead(r, hd.upgrade)
		if err == nil {
			err = uc.bw.Flush()
		}
	}
	var resp *http.Response
	if err == nil {
		resp, err = uc.readResponse(r)
	}
	if err != nil {
		if uc != nil {
			uc.close()
		}
		reply := upstreamFailure(err)
		s.logUpstream(up, err)
		h.writeLocal(reply, r.Close, r.Method)
		s.stats.record(s.rt.Labels, up.Workload, "http", reply.Status, reply.Flags, "", time.Since(start))
		return !r.Close
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		resp.Body = &h1RespBody{uc: uc, body: resp.Body, resp: resp, noReuse: true}
		ok := h.writeResponse(r, resp)
		s.stats.record(s.rt.Labels, up.Workload, "http", resp.StatusCode, "-", "", time.Since(start))
		return ok && !r.Close
	}
	bw := h.bw
	writeStatusLine(bw, resp.StatusCode)
	for k, vv := range resp.Header {
		for _, v := range vv {
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(v)
			bw.WriteString("\r\n")
		}
	}
	bw.WriteString("\r\n")
	if bw.Flush() != nil {
		uc.close()
		return false
	}
	tunnel.Join(&bufferedConn{Conn: s.c, r: h.br}, &bufferedConn{Conn: uc.nc, r: uc.br})
	uc.close()
	s.stats.record(s.rt.Labels, up.Workload, "http", resp.StatusCode, "-", "", time.Since(start))
	return false
}

// h1Body is the body of a client's HTTP/1.1 request, read from the stream's reader.
type h1Body struct {
	h         *h1Server
	chunked   bool
	remaining int64 // Content-Length bytes left
	cr        io.Reader
	trailer   http.Header // where a chunked body's trailer goes
	done      atomic.Bool // read to its end
	err       error
}

func (b *h1Body) Read(p []byte) (int, error) {
	if b.done.Load() {
		return 0, io.EOF
	}
	if b.err != nil {
		return 0, b.err
	}
	br := b.h.br
	if !b.chunked {
		if int64(len(p)) > b.remaining {
			p = p[:b.remaining]
		}
		n, err := br.Read(p)
		b.remaining -= int64(n)
		if b.remaining == 0 {
			b.done.Store(true)
			return n, io.EOF
		}
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		b.err = err
		return n, err
	}
	if b.cr == nil {
		b.cr = newChunkedReader(br)
	}
	n, err := b.cr.Read(p)
	if err == io.EOF {
		if err = b.readTrailer(); err == nil {
			b.done.Store(true)
			return n, io.EOF
		}
	}
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		b.err = err
	}
	return n, err
}

// readTrailer reads a chunked body's trailer section into the request's Trailer.
func (b *h1Body) readTrailer() error {
	h := b.h
	total := 0
	for count := 0; ; count++ {
		line, err := h.readLine(&total, h.s.p.MaxHeaderBytes)
		if err != nil {
			return err
		}
		if len(line) == 0 {
			return nil
		}
		i := bytes.IndexByte(line, ':')
		if count >= h.s.p.MaxHeaderCount || line[0] == ' ' || line[0] == '\t' || i <= 0 || !isToken(line[:i]) {
			return errors.New("malformed trailer")
		}
		if b.trailer != nil {
			k := canonicalKey(line[:i])
			switch k {
			case "Content-Length", "Transfer-Encoding", "Host", "Trailer", "Te", "Connection":
			default:
				b.trailer[k] = append(b.trailer[k], string(trimOWSBytes(line[i+1:])))
			}
		}
	}
}

// Close does nothing: a body the exchange did not read to its end keeps the connection
// from taking another request (the exchange closes it).
func (b *h1Body) Close() error { return nil }

func newChunkedReader(br *bufio.Reader) io.Reader { return httputil.NewChunkedReader(br) }

// wouldBlock reports that a Read would wait for the client.
func (b *h1Body) wouldBlock() bool { return b.h.br.Buffered() == 0 && !b.done.Load() }

// pending is a body that knows whether its next Read would wait: data is flushed only
// then, so a response read in one piece goes out in one write.
type pending interface{ wouldBlock() bool }

// h1Conn is an HTTP/1.1 connection to an endpoint.
type h1Conn struct {
	s   *session
	key poolKey
	nc  net.Conn
	lr  *countingReader
	br  *bufio.Reader
	bw  *bufio.Writer
	// ul is the upload of the request in flight, if any.
	ul *upload
}

// Bounds on what an endpoint sends: a response header (Envoy's default, 60 KiB, as for
// requests).
const maxResponseHeader = 60 << 10

// idleH1 bounds the idle HTTP/1.1 upstream connections a stream keeps.
const idleH1 = 4

func (s *session) newH1Conn(up Upstream) (*h1Conn, error) {
	nc, err := s.dialCounted(up)
	if err != nil {
		return nil, err
	}
	uc := &h1Conn{s: s, key: poolKey{up.Addr, up.Key}, nc: nc, lr: &countingReader{r: nc, limit: math.MaxInt64}}
	uc.br = getReader(uc.lr)
	uc.bw = getWriter(nc)
	return uc, nil
}

// close closes the connection; its buffers go back to the pools unless an upload may
// still use them.
func (uc *h1Conn) close() {
	uc.nc.Close()
	if uc.ul != nil && !uc.ul.finished() {
		return
	}
	putReader(uc.br)
	putWriter(uc.bw)
}

// h1Get returns an idle connection to up, or a new one; reused reports which.
func (s *session) h1Get(up Upstream) (uc *h1Conn, reused bool, err error) {
	k := poolKey{up.Addr, up.Key}
	s.mu.Lock()
	for i := len(s.idle) - 1; i >= 0; i-- {
		if c := s.idle[i]; c.key == k {
			s.idle = append(s.idle[:i], s.idle[i+1:]...)
			s.mu.Unlock()
			return c, true, nil
		}
	}
	s.mu.Unlock()
	uc, err = s.newH1Conn(up)
	return uc, false, err
}

func (s *session) putIdle(uc *h1Conn) {
	uc.ul = nil
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		uc.close()
		return
	}
	var old *h1Conn
	if len(s.idle) >= idleH1 {
		old = s.idle[0]
		s.idle = append(s.idle[:0], s.idle[1:]...)
	}
	s.idle = append(s.idle, uc)
	s.mu.Unlock()
	if old != nil {
		old.close()
	}
}

// errStale is a reused connection that failed before the endpoint answered a byte: the
// endpoint had closed it while idle. The request is sent again on a new one.
var errStale = errors.New("stale upstream connection")

// roundTripH1 sends r to up over HTTP/1.1.
func (s *session) roundTripH1(r *http.Request, up Upstream) (*http.Response, *upload, error) {
	for attempt := 0; ; attempt++ {
		uc, reused, err := s.h1Get(up)
		if err != nil {
			return nil, nil, err
		}
		resp, err := uc.roundTrip(r, reused)
		if err == nil {
			return resp, uc.ul, nil
		}
		ul := uc.ul
		uc.close()
		if errors.Is(err, errStale) && attempt == 0 {
			continue
		}
		return nil, ul, err
	}
}

// roundTrip writes r and reads the response header. A body is sent by a goroutine of
// ours (uc.ul) while the response is read, unless it is already buffered whole.
func (uc *h1Conn) roundTrip(r *http.Request, reused bool) (*http.Response, error) {
	uc.lr.n = 0
	if err := uc.writeHead(r, ""); err != nil {
		return nil, err
	}
	hasBody := r.Body != http.NoBody && r.Body != nil && r.ContentLength != 0
	switch {
	case !hasBody:
		if err := uc.bw.Flush(); err != nil {
			if reused {
				return nil, errStale
			}
			return nil, err
		}
	case bufferedWhole(r):
		if err := uc.writeBody(r); err != nil {
			return nil, err
		}
	default:
		uc.ul = &upload{done: make(chan struct{})}
		go func() {
			uc.ul.err = uc.writeBody(r)
			close(uc.ul.done)
		}()
	}
	resp, err := uc.readResponse(r)
	if err != nil {
		if reused && !hasBody && uc.lr.n == 0 {
			return nil, errStale
		}
		return nil, err
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return nil, errors.New("101 Switching Protocols to a request that asked for no upgrade")
	}
	resp.Body = &h1RespBody{uc: uc, body: resp.Body, resp: resp, noReuse: r.Close, eof: resp.Body == http.NoBody}
	return resp, nil
}

// bufferedWhole reports whether r's body is a Content-Length body already read from
// the client whole: it is written without a goroutine.
func bufferedWhole(r *http.Request) bool {
	b, ok := r.Body.(*h1Body)
	return ok && !b.chunked && b.remaining <= int64(b.h.br.Buffered())
}

// readResponse reads a response header, skipping interim (1xx) responses other than 101;
// the header is bounded by maxResponseHeader.
func (uc *h1Conn) readResponse(r *http.Request) (*http.Response, error) {
	for {
		uc.lr.limit = uc.lr.n + maxResponseHeader
		resp, err := http.ReadResponse(uc.br, r)
		uc.lr.limit = math.MaxInt64
		if err != nil {
			return nil, err
		}
		if resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			return resp, nil
		}
	}
}

// headerError is a request header that cannot be sent (Decide wrote one with a CR or
// LF): answered 500.
type headerError struct{ name string }

func (e *headerError) Error() string { return "invalid header " + strconv.Quote(e.name) }

// writeHead writes the request line and header; upgrade, when set, is sent as the
// Upgrade of a websocket upgrade.
func (uc *h1Conn) writeHead(r *http.Request, upgrade string) error {
	if !httpguts.ValidHostHeader(r.Host) {
		return &headerError{"Host"}
	}
	bw := uc.bw
	bw.WriteString(r.Method)
	bw.WriteByte(' ')
	bw.WriteString(r.RequestURI)
	bw.WriteString(" HTTP/1.1\r\nHost: ")
	bw.WriteString(r.Host)
	bw.WriteString("\r\n")
	for k, vv := range r.Header {
		switch k {
		case "Host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade", "Keep-Alive", "Proxy-Connection":
			continue
		}
		if !httpguts.ValidHeaderFieldName(k) {
			return &headerError{k}
		}
		for _, v := range vv {
			if !httpguts.ValidHeaderFieldValue(v) {
				return &headerError{k}
			}
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(v)
			bw.WriteString("\r\n")
		}
	}
	hasBody := r.Body != http.NoBody && r.Body != nil
	switch {
	case hasBody && r.ContentLength < 0:
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	case r.ContentLength > 0 || r.Header["Content-Length"] != nil || r.Method == http.MethodPost || r.Method == http.MethodPut || r.Method == http.MethodPatch:
		bw.WriteString("Content-Length: ")
		bw.Write(strconv.AppendInt(bw.AvailableBuffer(), max(r.ContentLength, 0), 10))
		bw.WriteString("\r\n")
	}
	if upgrade != "" {
		bw.WriteString("Connection: Upgrade\r\nUpgrade: ")
		bw.WriteString(upgrade)
		bw.WriteString("\r\n")
	}
	_, err := bw.WriteString("\r\n")
	return err
}

// writeBody sends r's body, chunked when its length is unknown, then flushes.
func (uc *h1Conn) writeBody(r *http.Request) error {
	bw := uc.bw
	bp := copyPool.Get().(*[]byte)
	defer copyPool.Put(bp)
	buf := *bp
	pb, _ := r.Body.(pending)
	chunked := r.ContentLength < 0
	left := r.ContentLength
	for {
		n, err := r.Body.Read(buf)
		if n > 0 {
			if chunked {
				bw.Write(strconv.AppendInt(bw.AvailableBuffer(), int64(n), 16))
				bw.WriteString("\r\n")
				bw.Write(buf[:n])
				bw.WriteString("\r\n")
			} else {
				if int64(n) > left {
					return errors.New("request body longer than its Content-Length")
				}
				left -= int64(n)
				bw.Write(buf[:n])
			}
			if pb == nil || pb.wouldBlock() {
				if werr := bw.Flush(); werr != nil {
					return werr
				}
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
	}
	if !chunked && left != 0 {
		return io.ErrUnexpectedEOF
	}
	if chunked {
		writeLastChunk(bw, r.Trailer)
	}
	return bw.Flush()
}

// upload is a request body a goroutine of ours sends upstream.
type upload struct {
	done chan struct{}
	err  error
}

func (u *upload) wait() { <-u.done }

func (u *upload) finished() bool {
	select {
	case <-u.done:
		return true
	default:
		return false
	}
}

// h1RespBody is an upstream response body; Close returns the connection to the pool
// when the exchange ended cleanly, else closes it.
type h1RespBody struct {
	uc      *h1Conn
	body    io.ReadCloser
	resp    *http.Response
	noReuse bool
	n       int64
	eof     bool
	once    sync.Once
}

func (b *h1RespBody) Read(p []byte) (int, error) {
	n, err := b.body.Read(p)
	b.n += int64(n)
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

func (b *h1RespBody) wouldBlock() bool {
	if b.resp.ContentLength >= 0 && b.n >= b.resp.ContentLength {
		return false
	}
	return b.uc.br.Buffered() == 0
}

func (b *h1RespBody) Close() error {
	b.once.Do(func() {
		uc := b.uc
		ul := uc.ul
		reuse := b.eof && !b.noReuse && !b.resp.Close && uc.br.Buffered() == 0 && (ul == nil || ul.finished() && ul.err == nil)
		if reuse {
			uc.s.putIdle(uc)
			return
		}
		uc.close()
	})
	return nil
}

// countingReader counts the bytes read from an upstream connection and ends the
// stream at limit (a response header over maxResponseHeader).
type countingReader struct {
	r        io.Reader
	n, limit int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	if c.n >= c.limit {
		return 0, errHeaderTooLarge
	}
	if left := c.limit - c.n; int64(len(p)) > left {
		p = p[:left]
	}
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// isToken reports whether b is an RFC 9110 token.
func isToken(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for _, c := range b {
		if !isTokenChar(c) {
			return false
		}
	}
	return true
}

func isTokenChar(c byte) bool {
	return c < 0x80 && httpguts.IsTokenRune(rune(c))
}

func trimOWSBytes(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t') {
		b = b[:len(b)-1]
	}
	return b
}

// commonKeys interns the canonical form of common header names, in any case.
var commonKeys = func() map[string]string {
	m := map[string]string{}
	for _, k := range []string{"Accept", "Accept-Encoding", "Accept-Language", "Authorization", "Cache-Control",
		"Connection", "Content-Length", "Content-Type", "Cookie", "Expect", "Host", "If-Modified-Since",
		"If-None-Match", "Keep-Alive", "Origin", "Proxy-Connection", "Referer", "Te", "Trailer",
		"Transfer-Encoding", "Upgrade", "User-Agent", "X-Forwarded-For", "X-Forwarded-Proto",
		"X-Request-Id", "X-Forwarded-Client-Cert", "Traceparent", "Baggage", "Grpc-Timeout",
		"Http2-Settings", "Sec-Websocket-Key", "Sec-Websocket-Version", "Sec-Websocket-Protocol"} {
		m[k] = k
		m[strings.ToLower(k)] = k
	}
	return m
}()

func canonicalKey(b []byte) string {
	if k, ok := commonKeys[string(b)]; ok {
		return k
	}
	return textproto.CanonicalMIMEHeaderKey(string(b))
}

// internMethod returns m as a string, without allocating for the common methods.
func internMethod(m []byte) string {
	switch string(m) {
	case "GET":
		return http.MethodGet
	case "POST":
		return http.MethodPost
	case "PUT":
		return http.MethodPut
	case "HEAD":
		return http.MethodHead
	case "DELETE":
		return http.MethodDelete
	case "PATCH":
		return http.MethodPatch
	case "OPTIONS":
		return http.MethodOptions
	case "CONNECT":
		return http.MethodConnect
	}
	return string(m)
}

// writeLastChunk ends a chunked body: the last chunk and the trailer fields (those with a
// valid name and value).
func writeLastChunk(bw *bufio.Writer, trailer http.Header) {
	bw.WriteString("0\r\n")
	for k, vv := range trailer {
		if !httpguts.ValidHeaderFieldName(k) {
			continue
		}
		for _, v := range vv {
			if httpguts.ValidHeaderFieldValue(v) {
				bw.WriteString(k)
				bw.WriteString(": ")
				bw.WriteString(v)
				bw.WriteString("\r\n")
			}
		}
	}
	bw.WriteString("\r\n")
}
