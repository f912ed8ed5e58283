package kafka

// EncodeProgress and DecodeProgress are the progress record's encoding, for tests.
var (
	EncodeProgress = encodeProgress
	DecodeProgress = decodeProgress
)
