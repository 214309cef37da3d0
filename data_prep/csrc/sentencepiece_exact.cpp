// An exact, faster encoder for sentencepiece unigram and BPE models, with a C ABI for ctypes.
//
// It gives the ids `SentencePieceProcessor.encode` gives, by doing what sentencepiece does, in the
// same order and arithmetic: the normalizer (user-defined symbols first, then the precompiled
// charsmap's longest rule, dummy prefix, whitespace collapsing, ' ' -> U+2581), then segmentation of
// the normalized text, then unknown pieces (merged, or split into byte pieces under byte fallback).
// What makes it faster is a cache of segmentations per whitespace-delimited chunk of the normalized
// text: the caller only accepts a model in which no piece can span a U+2581 that follows another
// character (see sentencepiece_cache.py), so every segmentation breaks there.
//
// BPE: a chunk's ids never depend on its neighbours, so cached ids are final. Chunks not seen before
// are handed back to the caller, which encodes them with sentencepiece itself (`spx_missing`).
//
// Unigram: sentencepiece's Viterbi (EncodeOptimized, as of sentencepiece 0.2.3) sums piece scores in
// float32 from the start of the text, and re-bases them to 0 whenever the score at a position passes
// +-1e5. A chunk's best path can therefore depend, through rounding, on the score P with which the
// text arrives at it. Each cached chunk carries its best path in exact arithmetic and the smallest
// margin by which any decision on that path was won; rounding moves a decision by at most
// (4 * chars + 2) * (|P| + |chunk score|) * 2^-24, so the cached path is used only when |P| is small
// enough for that margin to cover it (and for no re-basing to happen inside the chunk). Otherwise the
// chunk is segmented again, from P, by a replica of sentencepiece's Viterbi. Either way P moves on as
// in sentencepiece: float(P + score) along the path. Exact ties (margin 0) always take the replica.

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr int kNormal = 1;
constexpr int kUserDefined = 4;
constexpr int kUnused = 5;
constexpr int kUnigram = 1;
constexpr int kBpe = 2;
constexpr float kUnkPenalty = 10.0f;
constexpr float kScoreResetThreshold = 100000.0f;  // EncodeOptimized re-bases scores beyond it
constexpr std::string_view kSpace = "\xe2\x96\x81";  // U+2581, sentencepiece's escaped space

inline size_t one_char_len(const char *p) {
  return "\1\1\1\1\1\1\1\1\1\1\1\1\2\2\3\4"[(*p & 0xFF) >> 4];
}

inline bool is_space_at(const char *p, size_t left) {
  return left >= 3 && std::memcmp(p, kSpace.data(), 3) == 0;
}

// A byte trie: the model's pieces, or its user-defined symbols. The root, and after `finish` every
// node with many children (the one after "▁" has one per letter), look children up in a table of 256.
class Trie {
 public:
  Trie() { nodes_.emplace_back(); dense_.assign(256, -1); nodes_[0].dense = 0; }

  void insert(std::string_view key, int32_t value) {
    int32_t node = 0;
    for (unsigned char b : key) {
      int32_t next = child(node, b);
      if (next < 0) {
        next = static_cast<int32_t>(nodes_.size());
        nodes_.emplace_back();
        if (nodes_[node].dense >= 0) dense_[nodes_[node].dense + b] = next;
        else nodes_[node].kids.emplace_back(b, next);
      }
      node = next;
    }
    nodes_[node].value = value;
    empty_ = false;
  }

  // After the last insert: tables for nodes with many children, and every node's children in one
  // flat array (the lookups of a Viterbi pass stay in a few cache lines).
  void finish() {
    flat_.assign(nodes_.size(), Flat{});
    kid_bytes_.clear();
    kid_nodes_.clear();
    for (size_t i = 0; i < nodes_.size(); ++i) {
      Node &n = nodes_[i];
      if (n.dense < 0 && n.kids.size() >= kDenseFrom) {
        n.dense = static_cast<int32_t>(dense_.size());
        dense_.resize(dense_.size() + 256, -1);
        for (const auto &k : n.kids) dense_[n.dense + k.first] = k.second;
        n.kids.clear();
      }
      flat_[i] = Flat{n.value, n.dense, static_cast<uint32_t>(kid_bytes_.size()), static_cast<uint32_t>(n.kids.size())};
      for (const auto &k : n.kids) {
        kid_bytes_.push_back(k.first);
        kid_nodes_.push_back(k.second);
      }
    }
    finished_ = true;
  }

  int32_t child(int32_t node, unsigned char b) const {
    if (!finished_) {
      const Node &n = nodes_[node];
      if (n.dense >= 0) return dense_[n.dense + b];
      for (const auto &k : n.kids)
        if (k.first == b) return k.second;
      return -1;
    }
    const Flat &f = flat_[node];
    if (f.dense >= 0) return dense_[f.dense + b];
    for (uint32_t i = f.kids_at, end = f.kids_at + f.n_kids; i < end; ++i)
      if (kid_bytes_[i] == b) return kid_nodes_[i];
    return -1;
  }

  int32_t value(int32_t node) const { return finished_ ? flat_[node].value : nodes_[node].value; }
  bool empty() const { return empty_; }

  // Length of the longest key that is a prefix of s[0, n), 0 if none.
  size_t longest_prefix(const char *s, size_t n) const {
    size_t best = 0;
    int32_t node = 0;
    for (size_t i = 0; i < n; ++i) {
      node = child(node, static_cast<unsigned char>(s[i]));
      if (node < 0) break;
      if (nodes_[node].value >= 0) best = i + 1;
    }
    return best;
  }

 private:
  static constexpr size_t kDenseFrom = 8;
  struct Node {
    int32_t value = -1;
    int32_t dense = -1;  // offset of its table in dense_, or -1: look in kids
    std::vector<std::pair<unsigned char, int32_t>> kids;
  };
  struct Flat {
    int32_t value = -1;
    int32_t dense = -1;
    uint32_t kids_at = 0, n_kids = 0;
  };
  std::vector<Node> nodes_;
  std::vector<int32_t> dense_;
  std::vector<Flat> flat_;
  std::vector<unsigned char> kid_bytes_;
  std::vector<int32_t> kid_nodes_;
  bool empty_ = true;
  bool finished_ = false;
};

// Read access to a darts-clone double array: the format of a precompiled charsmap's trie.
class DoubleArray {
 public:
  void set(const uint32_t *units, size_t size) { units_ = units; size_ = size; }
  bool empty() const { return size_ == 0; }

  // As DoubleArray::commonPrefixSearch: (value, length) of each key that is a prefix of key[0, n),
  // shortest first, at most max_results of them stored.
  size_t common_prefix_search(const char *key, size_t n, std::pair<uint32_t, size_t> *results,
                              size_t max_results) const {
    size_t found = 0;
    size_t pos = 0;
    uint32_t unit = units_[pos];
    pos ^= offset(unit);
    for (size_t i = 0; i < n; ++i) {
      const auto b = static_cast<unsigned char>(key[i]);
      pos ^= b;
      if (pos >= size_) return found;
      unit = units_[pos];
      if (label(unit) != b) return found;
      pos ^= offset(unit);
      if (pos >= size_) return found;
      if (has_leaf(unit)) {
        if (found < max_results) results[found] = {units_[pos] & ((1U << 31) - 1), i + 1};
        ++found;
      }
    }
    return found;
  }

 private:
  static bool has_leaf(uint32_t u) { return ((u >> 8) & 1) == 1; }
  static uint32_t label(uint32_t u) { return u & ((1U << 31) | 0xFF); }
  static uint32_t offset(uint32_t u) { return (u >> 10) << ((u & (1U << 9)) >> 6); }
  const uint32_t *units_ = nullptr;
  size_t size_ = 0;
};

// sentencepiece's Normalizer::Normalize, without the offsets it keeps for surfaces.
class Normalizer {
 public:
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  Trie user_defined;  // sentencepiece's PrefixMatcher: these pass through unnormalized

  Normalizer() { special_[static_cast<unsigned char>(' ')] = true; }

  void add_user_defined(std::string_view symbol, int32_t id) {
    user_defined.insert(symbol, id);
    special_[static_cast<unsigned char>(symbol[0])] = true;
    user_defined_start_[static_cast<unsigned char>(symbol[0])] = true;
  }

  bool set_charsmap(const char *blob, size_t size) {
    charsmap_.assign(blob, size);
    if (size == 0) return true;
    uint32_t trie_size = 0;
    if (size <= 4) return false;
    std::memcpy(&trie_size, charsmap_.data(), 4);
    if (trie_size >= size || trie_size % 4 != 0) return false;
    units_.resize(trie_size / 4);
    std::memcpy(units_.data(), charsmap_.data() + 4, trie_size);
    trie_.set(units_.data(), units_.size());
    replacements_ = charsmap_.data() + 4 + trie_size;
    replacements_size_ = size - 4 - trie_size;
    return true;
  }

  void normalize(std::string_view in, std::string &out) const {
    out.clear();
    if (in.empty()) return;
    if (remove_extra_whitespaces) {
      while (!in.empty()) {
        const auto p = prefix(in);
        if (p.first != " ") break;
        in.remove_prefix(p.second);
      }
    }
    if (in.empty()) return;
    // Written through a pointer into a buffer big enough for the text with every byte a '▁' (the
    // most a byte can become without a charsmap); a charsmap rule may write more, so with one the
    // buffer is grown as needed.
    out.resize(in.size() * 3 + 3);
    char *w = out.data();
    const auto put = [&](const char *data, size_t n) {
      if (!trie_.empty() && static_cast<size_t>(w - out.data()) + n > out.size()) {
        const size_t at = w - out.data();
        out.resize(std::max(out.size() * 2, at + n));
        w = out.data() + at;
      }
      std::memcpy(w, data, n);
      w += n;
    };
    if (add_dummy_prefix) put(kSpace.data(), 3);
    bool prev_space = remove_extra_whitespaces;
    while (!in.empty()) {
      if (trie_.empty()) {
        // Without a charsmap: a run of bytes that are neither ' ' nor the start of a user-defined
        // symbol is copied as it is (it ends between characters: both are character starts), and a
        // lone ' ' is what NormalizePrefix would give, handled inline.
        // Bytes are copied as they are scanned: short runs (words) make memcpy calls the cost.
        size_t k = 0;
        const char *src = in.data();
        while (k < in.size() && !special_[static_cast<unsigned char>(src[k])]) {
          w[k] = src[k];
          ++k;
        }
        if (k > 0) {
          w += k;
          in.remove_prefix(k);
          prev_space = false;
          continue;
        }
        if (in.front() == ' ' && !user_defined_start_[static_cast<unsigned char>(' ')]) {
          if (!prev_space) {
            w[0] = kSpace[0], w[1] = kSpace[1], w[2] = kSpace[2];
            w += 3;
          }
          prev_space = remove_extra_whitespaces;
          in.remove_prefix(1);
          continue;
        }
      }
      const auto p = prefix(in);
      std::string_view piece = p.first;
      while (prev_space && !piece.empty() && piece.front() == ' ') piece.remove_prefix(1);
      if (!piece.empty()) {
        for (char c : piece) {
          if (c == ' ') put(kSpace.data(), 3);
          else put(&c, 1);
        }
        prev_space = piece.back() == ' ';
      }
      in.remove_prefix(p.second);
      if (!remove_extra_whitespaces) prev_space = false;
    }
    if (remove_extra_whitespaces) {
      while (w - out.data() >= 3 && std::memcmp(w - 3, kSpace.data(), 3) == 0) w -= 3;
    }
    out.resize(w - out.data());
  }

  // NormalizePrefix: what the text's first characters become, and how many bytes they are.
  std::pair<std::string_view, size_t> prefix(std::string_view in) const {
    if (!user_defined.empty()) {
      const size_t n = user_defined.longest_prefix(in.data(), in.size());
      if (n > 0) return {in.substr(0, n), n};
    }
    if (!trie_.empty()) {
      std::pair<uint32_t, size_t> results[32];  // Normalizer::kMaxTrieResultsSize
      const size_t found = std::min<size_t>(trie_.common_prefix_search(in.data(), in.size(), results, 32), 32);
      size_t longest = 0;
      uint32_t value = 0;
      for (size_t k = 0; k < found; ++k) {
        if (longest == 0 || results[k].second > longest) {
          longest = results[k].second;
          value = results[k].first;
        }
      }
      if (longest > 0 && value < replacements_size_) {
        const char *s = replacements_ + value;
        return {std::string_view(s, strnlen(s, replacements_size_ - value)), longest};
      }
    }
    // The text comes from Python's strict UTF-8 encoder, so it is valid UTF-8.
    const size_t n = std::min(one_char_len(in.data()), in.size());
    return {in.substr(0, n), n};
  }

  bool special_[256] = {};  // ' ' and first bytes of user-defined symbols; set in the constructor
  bool user_defined_start_[256] = {};
  std::string charsmap_;
  std::vector<uint32_t> units_;
  DoubleArray trie_;
  const char *replacements_ = nullptr;
  size_t replacements_size_ = 0;
};

// A cached chunk: its ids, and for unigram its path's scores and the largest |P| it holds for.
struct Entry {
  uint32_t ids_at, ids_len;
  uint32_t scores_at, scores_len;
  double max_abs_p;
};

// chunk -> Entry, open addressing with linear probing. A slot is 8 bytes (hash tag, entry number), so
// the table stays small enough for the caches; entries and keys sit in insertion order, which keeps
// the frequent chunks (met first) close together. Lookups were memory-bound with a node-based map.
class ChunkTable {
 public:
  const Entry *find(std::string_view key) const { return find(key, hash(key)); }

  // Lookups are memory-bound: a caller that knows the next keys asks for their slots (and then their
  // entries) ahead, so that several misses are in flight at once.
  void prefetch_slot(uint64_t h) const {
    if (!slots_.empty()) __builtin_prefetch(&slots_[h & mask_]);
  }
  void prefetch_entry(uint64_t h) const {
    if (slots_.empty()) return;
    const Slot &s = slots_[h & mask_];
    if (s.entry != kFree) __builtin_prefetch(&entries_[s.entry]);  // short keys are inside
  }

  // The entry in the key's first slot, unchecked: only to prefetch what it points to.
  const Entry *peek(uint64_t h) const {
    if (slots_.empty()) return nullptr;
    const Slot &s = slots_[h & mask_];
    return s.entry == kFree ? nullptr : &entries_[s.entry].entry;
  }

  // A multiply-xorshift hash, 8 bytes at a time: chunks are short, and std::hash was a tenth of
  // the time. Exactness never rests on it (keys are compared).
  static uint64_t hash(std::string_view key) {
    const char *p = key.data();
    size_t n = key.size();
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xFF51AFD7ED558CCDull);
    for (; n >= 8; p += 8, n -= 8) {
      uint64_t v;
      std::memcpy(&v, p, 8);
      h = (h ^ v) * 0xBF58476D1CE4E5B9ull;
      h ^= h >> 31;
    }
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(p[i])) << (8 * i);
    h = (h ^ v) * 0x94D049BB133111EBull;
    return h ^ (h >> 29);
  }

  const Entry *find(std::string_view key, uint64_t h) const {
    if (slots_.empty()) return nullptr;
    const auto tag = static_cast<uint32_t>(h >> 32);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot &s = slots_[i];
      if (s.entry == kFree) return nullptr;
      if (s.tag != tag) continue;
      const Keyed &k = entries_[s.entry];
      if (k.key_len == key.size() && std::memcmp(key_data(k), key.data(), key.size()) == 0) return &k.entry;
    }
  }

  // `key` (not empty) must not be in the table yet.
  const Entry &insert(std::string_view key, const Entry &entry) { return insert(key, hash(key), entry); }

  const Entry &insert(std::string_view key, uint64_t h, const Entry &entry) {
    if ((entries_.size() + 1) * 2 > slots_.size()) grow();
    free_slot(h) = Slot{static_cast<uint32_t>(h >> 32), static_cast<uint32_t>(entries_.size())};
    Keyed &k = entries_.emplace_back();
    k.hash = h;
    k.key_len = static_cast<uint32_t>(key.size());
    k.entry = entry;
    if (key.size() <= kInline) {
      std::memcpy(k.inline_key, key.data(), key.size());
    } else {
      k.key_at = keys_.size();
      keys_.append(key);
    }
    return k.entry;
  }

  size_t size() const { return entries_.size(); }
  size_t key_bytes() const { return keys_.size(); }
  void clear() {
    slots_.clear();
    entries_.clear();
    keys_.clear();
  }

 private:
  static constexpr uint32_t kFree = 0xFFFFFFFFu;
  struct Slot {
    uint32_t tag;
    uint32_t entry;  // kFree: empty
  };
  static constexpr size_t kInline = 16;
  // One cache line: the entry, and the key itself when it is short (most chunks are).
  struct alignas(64) Keyed {
    uint64_t hash;    // kept: growing the table does not hash the keys again
    uint64_t key_at;  // in keys_, for keys longer than kInline
    uint32_t key_len;
    Entry entry;
    char inline_key[kInline];
  };

  const char *key_data(const Keyed &k) const { return k.key_len <= kInline ? k.inline_key : keys_.data() + k.key_at; }

  Slot &free_slot(uint64_t h) {
    size_t i = h & mask_;
    while (slots_[i].entry != kFree) i = (i + 1) & mask_;
    return slots_[i];
  }

  void grow() {
    slots_.assign(std::max<size_t>(slots_.size() * 2, 1 << 19), Slot{0, kFree});
    mask_ = slots_.size() - 1;
    for (size_t e = 0; e < entries_.size(); ++e) {
      const uint64_t h = entries_[e].hash;
      free_slot(h) = Slot{static_cast<uint32_t>(h >> 32), static_cast<uint32_t>(e)};
    }
  }

  std::vector<Slot> slots_;
  std::vector<Keyed> entries_;
  std::string keys_;
  size_t mask_ = 0;
};

// One best-path node of the Viterbi (EncodeOptimized's BestPathNode, plus what the exact pass needs).
struct Node {
  double value;   // best score ending here: float-rounded in the replica, exact in the exact pass
  double second;  // exact pass: best of the other candidates
  int32_t start;
  int32_t id;
};

class Encoder {
 public:
  Normalizer norm;
  int model_type = kUnigram;
  bool byte_fallback = false;
  int32_t unk_id = 0;
  size_t max_cached_chunks = 1000000;

  void init(const char *blob, const int64_t *offsets, const float *scores, const int32_t *types,
            int32_t n) {
    type_.assign(types, types + n);
    score_.assign(scores, scores + n);
    std::fill(std::begin(byte_ids_), std::end(byte_ids_), unk_id);
    float min_score = FLT_MAX;  // as sentencepiece initialises it
    for (int32_t i = 0; i < n; ++i) {
      const std::string_view piece(blob + offsets[i], offsets[i + 1] - offsets[i]);
      if (types[i] == kNormal || types[i] == kUserDefined || types[i] == kUnused) pieces_.insert(piece, i);
      if (types[i] == kUserDefined) norm.add_user_defined(piece, i);
      if (types[i] == kNormal) min_score = std::min(min_score, scores[i]);
      if (piece.size() == 6 && piece.substr(0, 3) == "<0x" && piece[5] == '>' && types[i] == 6) {
        const int b = static_cast<int>(std::strtol(std::string(piece.substr(3, 2)).c_str(), nullptr, 16));
        byte_ids_[b & 0xFF] = i;
      }
    }
    pieces_.finish();
    norm.user_defined.finish();
    unk_score_ = min_score - kUnkPenalty;
  }

  // Encodes texts[k] = data[offsets[k], offsets[k + 1]). Returns the number of ids, or for BPE minus
  // the number of chunks sentencepiece must first encode (`missing`, then `add`, then `assemble`).
  int64_t encode(const char *data, const int64_t *offsets, int32_t n_texts, int32_t eod) {
    // Cleared between batches, never during one: a batch needs all of its chunks at once.
    if (cache_.size() > max_cached_chunks || cache_.key_bytes() > (1u << 31) || ids_.size() > (1u << 31))
      clear_cache();
    eod_ = eod;
    out_.clear();
    sizes_.assign(n_texts, 0);
    texts_.resize(n_texts);
    for (int32_t k = 0; k < n_texts; ++k)
      norm.normalize(std::string_view(data + offsets[k], offsets[k + 1] - offsets[k]), texts_[k]);
    if (model_type == kBpe) return bpe_encode();
    for (int32_t k = 0; k < n_texts; ++k) {
      const size_t before = out_.size();
      unigram_text(texts_[k]);
      if (eod >= 0) out_.push_back(eod);
      sizes_[k] = static_cast<int64_t>(out_.size() - before);
    }
    return static_cast<int64_t>(out_.size());
  }

  // BPE: the chunks to encode, concatenated, with n + 1 offsets.
  const std::vector<std::string> &missing() const { return missing_; }

  void add(const int32_t *ids, const int64_t *offsets) {
    missing_entries_.clear();
    for (size_t m = 0; m < missing_.size(); ++m)
      missing_entries_.push_back(insert(missing_[m], ids + offsets[m],
                                        static_cast<uint32_t>(offsets[m + 1] - offsets[m]), nullptr, 0, 0.0,
                                        ChunkTable::hash(missing_[m])));
    missing_.clear();
  }

  // BPE: the output from the entries the lookup pass found (missing ones now added).
  int64_t assemble() {
    out_.clear();
    size_t r = 0;
    for (size_t k = 0; k < texts_.size(); ++k) {
      const size_t before = out_.size();
      for (size_t end = r + refs_per_text_[k]; r < end; ++r) {
        const Entry &e = refs_[r].ids_len == kMissingRef ? missing_entries_[refs_[r].ids_at] : refs_[r];
        out_.insert(out_.end(), ids_.begin() + e.ids_at, ids_.begin() + e.ids_at + e.ids_len);
      }
      if (eod_ >= 0) out_.push_back(eod_);
      sizes_[k] = static_cast<int64_t>(out_.size() - before);
    }
    return static_cast<int64_t>(out_.size());
  }

  void output(int32_t *ids, int64_t *sizes) const {
    std::memcpy(ids, out_.data(), out_.size() * sizeof(int32_t));
    std::memcpy(sizes, sizes_.data(), sizes_.size() * sizeof(int64_t));
  }

  // Test hooks. use_cache: 1 as described above; 0 segments every unigram chunk with the replica; 2
  // trusts every cached unigram path whatever P is (wrong: for tests to show that the guard matters).
  int use_cache = 1;
  std::string normalized;
  size_t cached_chunks() const { return cache_.size(); }
  int64_t replica_chunks = 0;

 private:
  template <typename F>
  static void for_each_chunk(const std::string &s, F &&f) {
    // Cut before every U+2581 that follows another character ("▁▁▁word" stays one chunk). Every
    // U+2581 starts with 0xE2, which no UTF-8 continuation byte is.
    const char *p = s.data();
    const size_t n = s.size();
    size_t start = 0, i = 0;
    bool prev_space = false;
    while (i < n) {
      const auto *q = static_cast<const char *>(std::memchr(p + i, 0xE2, n - i));
      if (q == nullptr) break;
      const size_t j = static_cast<size_t>(q - p);
      if (j > i) prev_space = false;
      if (is_space_at(q, n - j)) {
        if (!prev_space && j > start) {
          f(std::string_view(p + start, j - start));
          start = j;
        }
        prev_space = true;
        i = j + 3;
      } else {
        prev_space = false;
        i = j + 1;
      }
    }
    if (n > start) f(std::string_view(p + start, n - start));
  }

  void clear_cache() {
    cache_.clear();
    ids_.clear();
    path_scores_.clear();
  }

  const Entry &insert(std::string_view chunk, const int32_t *ids, uint32_t n_ids, const float *scores,
                      uint32_t n_scores, double max_abs_p, uint64_t hash) {
    Entry e{static_cast<uint32_t>(ids_.size()), n_ids, static_cast<uint32_t>(path_scores_.size()), n_scores,
            max_abs_p};
    ids_.insert(ids_.end(), ids, ids + n_ids);
    if (n_scores) path_scores_.insert(path_scores_.end(), scores, scores + n_scores);
    return cache_.insert(chunk, hash, e);
  }

  // BPE: one lookup pass; each chunk's entry, or the number of the missing chunk it waits for.
  int64_t bpe_encode() {
    missing_.clear();
    refs_.clear();
    refs_per_text_.clear();
    std::unordered_map<std::string_view, uint32_t> missing_index;
    for (const auto &t : texts_) {
      split(t);
      const size_t n = chunks_.size();
      for (size_t i = 0; i < n; ++i) {
        if (i + kSlotsAhead < n) cache_.prefetch_slot(chunks_[i + kSlotsAhead].second);
        if (i + kEntriesAhead < n) cache_.prefetch_entry(chunks_[i + kEntriesAhead].second);
        const Entry *e = cache_.find(chunks_[i].first, chunks_[i].second);
        if (e != nullptr) {
          refs_.push_back(*e);
          continue;
        }
        const auto [it, added] = missing_index.emplace(chunks_[i].first, static_cast<uint32_t>(missing_.size()));
        if (added) missing_.emplace_back(chunks_[i].first);
        refs_.push_back(Entry{it->second, kMissingRef, 0, 0, 0.0});
      }
      refs_per_text_.push_back(n);
    }
    if (!missing_.empty()) return -static_cast<int64_t>(missing_.size());
    return assemble();
  }

  // --- unigram

  float piece_score(int32_t id, size_t length) const {
    // GetUserDefinedScore: user-defined symbols always win over normal pieces (log probabilities).
    if (type_[id] == kUserDefined) return static_cast<float>(0.1 * static_cast<int>(length - 1));
    return score_[id];
  }

  // The Viterbi pass of EncodeOptimized over one chunk. exact=false: sentencepiece's float32
  // arithmetic from the score p, including its re-basing of scores beyond +-1e5. exact=true: no
  // rounding at all, and each node also keeps its best losing candidate, for margins.
  template <bool exact>
  void viterbi(std::string_view s, float p, double *max_abs) {
    const size_t n = s.size();
    nodes_.assign(n + 1, Node{0.0, -std::numeric_limits<double>::infinity(), -1, -1});
    nodes_[0].value = exact ? 0.0 : static_cast<double>(p);
    double biggest = 0.0;
    size_t max_frontier = 0;
    const auto offer = [&](size_t target, double cand, size_t start, int32_t id) {
      Node &t = nodes_[target];
      max_frontier = std::max(max_frontier, target);
      if constexpr (exact) {
        biggest = std::max(biggest, std::fabs(cand));
        if (t.start == -1 || cand > t.value) {
          if (t.start != -1) t.second = t.value;
          t.value = cand;
          t.start = static_cast<int32_t>(start);
          t.id = id;
        } else {
          t.second = std::max(t.second, cand);
        }
      } else if (t.start == -1 || cand > t.value) {  // cand and t.value hold floats here
        t.value = cand;
        t.start = static_cast<int32_t>(start);
        t.id = id;
      }
    };
    size_t start = 0;
    while (start < n) {
      double here = nodes_[start].value;
      if (!exact && std::fabs(here) > kScoreResetThreshold) {
        const float offset = static_cast<float>(here);
        for (size_t i = start; i <= max_frontier; ++i) {
          if (i == start || nodes_[i].start != -1)
            nodes_[i].value = static_cast<double>(static_cast<float>(nodes_[i].value) - offset);
        }
        here = 0.0;
      }
      bool has_single = false;
      const size_t mblen = std::min(one_char_len(s.data() + start), n - start);
      int32_t node = 0;
      for (size_t key = start; key < n;) {
        node = pieces_.child(node, static_cast<unsigned char>(s[key]));
        if (node < 0) break;
        ++key;
        const int32_t id = pieces_.value(node);
        if (id < 0 || type_[id] == kUnused) continue;
        const size_t length = key - start;
        offer(key, add<exact>(piece_score(id, length), here), start, id);
        if (length == mblen) has_single = true;
      }
      if (!has_single) offer(start + mblen, add<exact>(unk_score_, here), start, unk_id);
      start += mblen;
    }
    if (max_abs) *max_abs = biggest;
  }

  // A candidate's score: float + float as sentencepiece adds them, or exactly.
  template <bool exact>
  static double add(float score, double here) {
    if constexpr (exact) return static_cast<double>(score) + here;
    return static_cast<double>(score + static_cast<float>(here));
  }

  // The path from the last Viterbi pass, as output ids (unknowns merged or split into bytes) and as
  // path scores; returns the smallest margin along it (exact pass).
  double path_ids(std::string_view s, std::vector<int32_t> &ids, std::vector<float> &scores) {
    path_.clear();
    for (size_t end = s.size(); end > 0; end = nodes_[end].start) path_.push_back(end);
    ids.clear();
    scores.clear();
    double margin = std::numeric_limits<double>::infinity();
    bool prev_unk = false;
    for (auto it = path_.rbegin(); it != path_.rend(); ++it) {
      const Node &node = nodes_[*it];
      margin = std::min(margin, node.value - node.second);
      const bool unk = node.id == unk_id;
      const std::string_view surface = s.substr(node.start, *it - node.start);
      scores.push_back(unk ? unk_score_ : piece_score(node.id, surface.size()));
      if (unk && byte_fallback) {
        for (unsigned char b : surface) ids.push_back(byte_ids_[b]);
      } else if (!(unk && prev_unk)) {
        ids.push_back(node.id);
      }
      prev_unk = unk;
    }
    return margin;
  }

  // chunks_ = the text's chunks with their hashes, and the first slots asked for. Callers then ask,
  // before looking up chunk i, for the slots and entries of the chunks a little further on.
  void split(const std::string &text) {
    chunks_.clear();
    for_each_chunk(text, [&](std::string_view chunk) { chunks_.emplace_back(chunk, ChunkTable::hash(chunk)); });
    for (size_t i = 0; i < std::min(chunks_.size(), kSlotsAhead); ++i) cache_.prefetch_slot(chunks_[i].second);
  }

  void unigram_text(const std::string &text) {
    split(text);
    float p = 0.0f;
    const size_t n = chunks_.size();
    for (size_t i = 0; i < n; ++i) {
      if (i + kSlotsAhead < n) cache_.prefetch_slot(chunks_[i + kSlotsAhead].second);
      if (i + kEntriesAhead < n) cache_.prefetch_entry(chunks_[i + kEntriesAhead].second);
      if (i + kDataAhead < n) prefetch_data(chunks_[i + kDataAhead].second);
      p = unigram_chunk(chunks_[i].first, chunks_[i].second, p);
    }
  }

  // Appends one chunk's ids, arriving with score p; returns the score it leaves with.
  float unigram_chunk(std::string_view chunk, uint64_t hash, float p) {
    {
      const Entry *e = use_cache ? cache_.find(chunk, hash) : nullptr;
      if (e == nullptr && use_cache) {
        double max_abs = 0.0;
        viterbi<true>(chunk, 0.0f, &max_abs);
        const double margin = path_ids(chunk, tmp_ids_, tmp_scores_);
        size_t chars = 0;  // bytes that start a character
        for (char c : chunk) chars += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
        // Decisions hold while margin > (4 chars + 2) * (|P| + max_abs) * 2^-24 (plus slack for the
        // double arithmetic of the exact pass), and no score in the chunk reaches the re-basing
        // threshold while |P| + max_abs, plus rounding, stays below it.
        const double unit = std::ldexp(1.0, -24);
        const double per_unit = (4.0 * chars + 2.0) * unit + std::ldexp(1.0, -40);
        const double max_abs_p = std::min((margin - 1e-9) / per_unit - max_abs,
                                          kScoreResetThreshold / (1.0 + (chars + 1.0) * unit) - max_abs - 1e-3);
        e = &insert(chunk, tmp_ids_.data(), static_cast<uint32_t>(tmp_ids_.size()), tmp_scores_.data(),
                    static_cast<uint32_t>(tmp_scores_.size()), max_abs_p, hash);
      }
      if (e != nullptr && (use_cache == 2 || std::fabs(static_cast<double>(p)) < e->max_abs_p)) {
        out_.insert(out_.end(), ids_.begin() + e->ids_at, ids_.begin() + e->ids_at + e->ids_len);
        for (uint32_t j = 0; j < e->scores_len; ++j)
          p = path_scores_[e->scores_at + j] + p;
        return p;
      }
    }
    ++replica_chunks;
    viterbi<false>(chunk, p, nullptr);
    p = static_cast<float>(nodes_[chunk.size()].value);
    path_ids(chunk, tmp_ids_, tmp_scores_);
    out_.insert(out_.end(), tmp_ids_.begin(), tmp_ids_.end());
    return p;
  }

  Trie pieces_;
  std::vector<int32_t> type_;
  std::vector<float> score_;
  int32_t byte_ids_[256];
  float unk_score_ = 0.0f;

  ChunkTable cache_;
  std::vector<int32_t> ids_;
  std::vector<float> path_scores_;

  std::vector<std::string> texts_;
  std::vector<std::string> missing_;
  static constexpr uint32_t kMissingRef = 0xFFFFFFFFu;  // an Entry's ids_len: ids_at numbers a missing chunk
  std::vector<Entry> refs_;
  std::vector<size_t> refs_per_text_;
  std::vector<Entry> missing_entries_;
  std::vector<int32_t> out_;
  std::vector<int64_t> sizes_;
  int32_t eod_ = -1;

  std::vector<Node> nodes_;
  std::vector<std::pair<std::string_view, uint64_t>> chunks_;
  static constexpr size_t kSlotsAhead = 16, kEntriesAhead = 8, kDataAhead = 4;

  void prefetch_data(uint64_t h) const {
    if (const Entry *e = cache_.peek(h)) {
      __builtin_prefetch(ids_.data() + e->ids_at);
      if (e->scores_len) __builtin_prefetch(path_scores_.data() + e->scores_at);
    }
  }
  std::vector<size_t> path_;
  std::vector<int32_t> tmp_ids_;
  std::vector<float> tmp_scores_;
};

}  // namespace

extern "C" {

// flags: 1 add_dummy_prefix, 2 remove_extra_whitespaces, 4 byte_fallback.
void *spx_new(int32_t model_type, int32_t flags, int32_t unk_id, const char *blob, const int64_t *offsets,
              const float *scores, const int32_t *types, int32_t n_pieces, const char *charsmap,
              int64_t charsmap_size, int64_t max_cached_chunks) {
  auto *e = new Encoder();
  e->model_type = model_type;
  e->norm.add_dummy_prefix = flags & 1;
  e->norm.remove_extra_whitespaces = flags & 2;
  e->byte_fallback = flags & 4;
  e->unk_id = unk_id;
  e->max_cached_chunks = static_cast<size_t>(max_cached_chunks);
  if ((model_type != kUnigram && model_type != kBpe) || !e->norm.set_charsmap(charsmap, charsmap_size)) {
    delete e;
    return nullptr;
  }
  e->init(blob, offsets, scores, types, n_pieces);
  return e;
}

void spx_free(void *h) { delete static_cast<Encoder *>(h); }

int64_t spx_encode(void *h, const char *data, const int64_t *offsets, int32_t n_texts, int32_t eod) {
  return static_cast<Encoder *>(h)->encode(data, offsets, n_texts, eod);
}

int64_t spx_missing_bytes(void *h) {
  int64_t total = 0;
  for (const auto &m : static_cast<Encoder *>(h)->missing()) total += static_cast<int64_t>(m.size());
  return total;
}

void spx_missing(void *h, char *blob, int64_t *offsets) {
  int64_t at = 0;
  offsets[0] = 0;
  size_t k = 0;
  for (const auto &m : static_cast<Encoder *>(h)->missing()) {
    std::memcpy(blob + at, m.data(), m.size());
    at += static_cast<int64_t>(m.size());
    offsets[++k] = at;
  }
}

int64_t spx_add_and_assemble(void *h, const int32_t *ids, const int64_t *offsets) {
  auto *e = static_cast<Encoder *>(h);
  e->add(ids, offsets);
  return e->assemble();
}

void spx_output(void *h, int32_t *ids, int64_t *sizes) { static_cast<Encoder *>(h)->output(ids, sizes); }

int64_t spx_normalize(void *h, const char *data, int64_t size) {
  auto *e = static_cast<Encoder *>(h);
  e->norm.normalize(std::string_view(data, size), e->normalized);
  return static_cast<int64_t>(e->normalized.size());
}

void spx_normalized(void *h, char *out) {
  const auto &s = static_cast<Encoder *>(h)->normalized;
  std::memcpy(out, s.data(), s.size());
}

void spx_set_use_cache(void *h, int32_t on) { static_cast<Encoder *>(h)->use_cache = on; }
int64_t spx_cached_chunks(void *h) { return static_cast<int64_t>(static_cast<Encoder *>(h)->cached_chunks()); }
int64_t spx_replica_chunks(void *h) { return static_cast<Encoder *>(h)->replica_chunks; }

}  // extern "C"
