// Version assignment at the Compose gateway (nginx njs): the same rule as the app's router,
// embedding_rollout/domain/traffic.py, so that both agree for a user key:
//   - the live weights come from the deployment state file ({"weights": {"v1": 90, "v2": 10}, ...});
//   - versions with a positive weight, newest first, take consecutive ranges of 10 000 buckets;
//   - a request with a user key (x-user-id header, else the uid cookie) falls in the bucket
//     sha256(key)[0:8] (big-endian) mod 10 000, so one user sees one version and raising the new
//     version's weight only moves users from old to new; other requests fall at random.
// No live version (no state yet): no header is set and the app answers for itself.
// Written for njs 0.7 and later (var, no optional chaining).
var fs = require('fs');
var crypto = require('crypto');

var BUCKETS = 10000;

function liveWeights(path) {
    try {
        var state = JSON.parse(fs.readFileSync(path, 'utf8'));
        return state.weights || {};
    } catch (e) {
        return {};
    }
}

function versionNumber(label) {
    return parseInt(label.slice(1), 10);
}

function bucketOf(key) {
    var hex = crypto.createHash('sha256').update(key).digest('hex');
    var bucket = 0;
    for (var i = 0; i < 8; i++) {
        bucket = (bucket * 256 + parseInt(hex.substr(2 * i, 2), 16)) % BUCKETS;
    }
    return bucket;
}

function pick(weights, point) {
    var ordered = Object.keys(weights)
        .filter(function (v) { return /^v[1-9][0-9]*$/.test(v) && weights[v] > 0; })
        .sort(function (a, b) { return versionNumber(b) - versionNumber(a); });
    if (ordered.length === 0) {
        return '';
    }
    var upper = 0;
    for (var i = 0; i < ordered.length; i++) {
        upper += weights[ordered[i]] * BUCKETS / 100;
        if (point < upper) {
            return ordered[i];
        }
    }
    return ordered[ordered.length - 1];
}

function assign(r) {
    var weights = liveWeights(r.variables.rollout_state);
    var key = r.headersIn['X-User-Id'] || r.variables.cookie_uid;
    return pick(weights, key ? bucketOf(key) : Math.random() * BUCKETS);
}

export default { assign: assign, bucketOf: bucketOf };
