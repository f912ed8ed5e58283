package kafka

// EncodeProgress is the progress record's encoding, for tests (DecodeProgress is exported).
var EncodeProgress = encodeProgress

// ProduceRequestSlack is what a produce request may hold beyond one batch, for tests.
const ProduceRequestSlack = produceRequestSlack
