package tunnel

import (
	"errors"
	"fmt"
	"net/http"
)

// StatusError is a CONNECT answered with a status other than 200, or a Handler's way
// of choosing that status.
type StatusError struct {
	Code int
	Err  error // the reason; sent to the peer only as the status text
}

func (e *StatusError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("hbone: %d %s", e.Code, http.StatusText(e.Code))
	}
	return fmt.Sprintf("hbone: %d %s: %v", e.Code, http.StatusText(e.Code), e.Err)
}

func (e *StatusError) Unwrap() error { return e.Err }

// Denied wraps a policy refusal: the stream is answered 401, as ztunnel does.
func Denied(err error) error { return &StatusError{Code: http.StatusUnauthorized, Err: err} }

// Unreachable wraps a failure to reach the destination: the stream is answered 503.
func Unreachable(err error) error { return &StatusError{Code: http.StatusServiceUnavailable, Err: err} }

func badRequest(format string, args ...any) error {
	return &StatusError{Code: http.StatusBadRequest, Err: fmt.Errorf(format, args...)}
}

// StatusCode returns the HBONE status of err: its StatusError's code, 503 for any other
// error, 200 for nil.
func StatusCode(err error) int {
	if err == nil {
		return http.StatusOK
	}
	var se *StatusError
	if errors.As(err, &se) {
		return se.Code
	}
	return http.StatusServiceUnavailable
}
