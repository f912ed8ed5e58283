package kafka

// EncodeProgress is the progress record's encoding, for tests (DecodeProgress is exported).
var EncodeProgress = encodeProgress
