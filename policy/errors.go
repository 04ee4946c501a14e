package policy

import (
	"errors"
	"strings"
)

// Sentinel errors; every error this package returns about an object wraps one of them.
var (
	// ErrSyntax marks YAML or JSON that does not decode into the object's schema.
	ErrSyntax = errors.New("syntax error")
	// ErrUnknownField marks a field the schema does not have (a typo, or a newer Istio field).
	ErrUnknownField = errors.New("unknown field")
	// ErrInvalid marks an object that decodes but that Istio's admission webhook would reject.
	ErrInvalid = errors.New("invalid")
	// ErrUnsupported marks an apiVersion or kind this package does not read.
	ErrUnsupported = errors.New("unsupported")
)

// ObjectError is an error about one object (or one YAML document), located as precisely as
// possible: file and line of the document, kind, namespace/name and the field path inside it.
// Its message reads like
//
//	testdata/x.yaml:12: AuthorizationPolicy bookinfo/ratings-policy: spec.rules[1].to[0].operation.ports[0]: "http" is not a port
type ObjectError struct {
	Source    string // "file:line", may be empty
	Kind      Kind   // zero if the document's kind is unknown
	Namespace string
	Name      string
	Path      string // field path such as spec.rules[0].from[0].source.ipBlocks[1], may be empty
	Err       error
}

func (e *ObjectError) Error() string {
	var b strings.Builder
	if e.Source != "" {
		b.WriteString(e.Source)
		b.WriteString(": ")
	}
	if e.Kind != 0 {
		b.WriteString(e.Kind.String())
		b.WriteByte(' ')
	}
	if e.Name != "" || e.Namespace != "" {
		b.WriteString(e.Namespace)
		b.WriteByte('/')
		b.WriteString(e.Name)
		b.WriteString(": ")
	}
	if e.Path != "" {
		b.WriteString(e.Path)
		b.WriteString(": ")
	}
	if e.Err != nil {
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

func (e *ObjectError) Unwrap() error { return e.Err }

// Key returns the key of the object the error is about.
func (e *ObjectError) Key() Key { return Key{e.Kind, e.Namespace, e.Name} }

// kindError is a message with a sentinel: errors.Is(err, ErrInvalid) holds for it.
type kindError struct {
	kind error
	msg  string
}

func (e *kindError) Error() string        { return e.msg }
func (e *kindError) Is(target error) bool { return target == e.kind }

// joinErrors is errors.Join, except that it returns nil for no errors.
func joinErrors(errs []error) error {
	if len(errs) == 0 {
		return nil
	}
	return errors.Join(errs...)
}
