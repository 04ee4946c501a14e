package jwtauth

// status is a jwt_verify_lib status: the outcome of verifying one token, or of a group of
// providers.
type status uint8

const (
	statusOK status = iota
	statusMissed
	statusNotYetValid
	statusExpired
	statusBadFormat
	statusHeaderBadBase64
	statusHeaderBadJSON
	statusHeaderBadAlg
	statusHeaderNotImplementedAlg
	statusHeaderBadKid
	statusPayloadBadBase64
	statusEd25519SignatureWrongLength
	statusPayloadBadJSON
	statusIssNotString
	statusSubNotString
	statusIatNotInteger
	statusIatOutOfRange
	statusNbfNotInteger
	statusNbfOutOfRange
	statusExpNotInteger
	statusExpOutOfRange
	statusJtiNotString
	statusAudNotString
	statusSignatureBadBase64
	statusUnknownIssuer
	statusAudienceNotAllowed
	statusVerificationFail
	statusJwksNoValidKeys
	statusJwksKidAlgMismatch
)

// String is the status text, exactly as Envoy sends it as the body of a 401 or 403
// (google/jwt_verify_lib status.cc).
func (s status) String() string {
	switch s {
	case statusOK:
		return "OK"
	case statusMissed:
		return "Jwt is missing"
	case statusNotYetValid:
		return "Jwt not yet valid"
	case statusExpired:
		return "Jwt is expired"
	case statusBadFormat:
		return "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
	case statusHeaderBadBase64:
		return "Jwt header is an invalid Base64url encoded"
	case statusHeaderBadJSON:
		return "Jwt header is an invalid JSON"
	case statusHeaderBadAlg:
		return "Jwt header [alg] field is required and must be a string"
	case statusHeaderNotImplementedAlg:
		return "Jwt header [alg] is not supported"
	case statusHeaderBadKid:
		return "Jwt header [kid] field is not a string"
	case statusPayloadBadBase64:
		return "Jwt payload is an invalid Base64url encoded"
	case statusEd25519SignatureWrongLength:
		return "Jwt ED25519 signature is wrong length"
	case statusPayloadBadJSON:
		return "Jwt payload is an invalid JSON"
	case statusIssNotString:
		return "Jwt payload [iss] field is not a string"
	case statusSubNotString:
		return "Jwt payload [sub] field is not a string"
	case statusIatNotInteger:
		return "Jwt payload [iat] field is not an integer"
	case statusIatOutOfRange:
		return "Jwt payload [iat] field is not a positive 64 bit integer"
	case statusNbfNotInteger:
		return "Jwt payload [nbf] field is not an integer"
	case statusNbfOutOfRange:
		return "Jwt payload [nbf] field is not a positive 64 bit integer"
	case statusExpNotInteger:
		return "Jwt payload [exp] field is not an integer"
	case statusExpOutOfRange:
		return "Jwt payload [exp] field is not a positive 64 bit integer"
	case statusJtiNotString:
		return "Jwt payload [jti] field is not a string"
	case statusAudNotString:
		return "Jwt payload [aud] field is not a string or string list"
	case statusSignatureBadBase64:
		return "Jwt signature is an invalid Base64url encoded"
	case statusUnknownIssuer:
		return "Jwt issuer is not configured"
	case statusAudienceNotAllowed:
		return "Audiences in Jwt are not allowed"
	case statusVerificationFail:
		return "Jwt verification fails"
	case statusJwksNoValidKeys:
		return "Jwks doesn't have any valid public key"
	case statusJwksKidAlgMismatch:
		return "Jwks doesn't have key to match kid or alg from Jwt"
	}
	return "Unknown status"
}
