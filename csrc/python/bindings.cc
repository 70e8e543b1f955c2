// ckptio._C: the only file that knows both the engine and Python.
//
// Every blocking call converts its arguments, then releases the GIL and waits
// in 100 ms slices so Ctrl-C is noticed. Status -> exception happens in
// RaiseStatus and nowhere else.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "engine/aligned_buffer.h"
#include "engine/crc32.h"
#include "engine/engine.h"
#include "engine/crash_recorder.h"
#include "engine/fault_injection.h"
#include "engine/pickle_check.h"
#include "native_pickler.h"
#include "pickle_fast_path.h"

namespace py = pybind11;
using namespace ckptio;

namespace {

// Text for Python from bytes that may not be UTF-8: record names and
// messages quote what a (possibly hostile) file holds, paths are the OS's.
py::str Text(const std::string& s) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "backslashreplace");
  if (o == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(o);
}

[[noreturn]] void RaiseStatus(const Status& s) {
  py::object make = py::module_::import("ckptio.errors").attr("from_engine_status");
  py::object exc = make(static_cast<int>(s.code()), s.error_number(), Text(s.path()), Text(s.record()),
                        Text(s.message()));
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw py::error_already_set();
}

// Calls wait(slice_seconds) -> bool with the GIL released, in slices of at
// most 100 ms, until it returns true (then true) or `timeout_seconds` pass
// (then false; < 0 waits forever). Between slices, Python signal handlers
// run: Ctrl-C raises KeyboardInterrupt here.
template <typename WaitFn>
bool WaitInterruptibly(WaitFn wait, double timeout_seconds) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_seconds < 0 ? 0 : timeout_seconds);
  for (;;) {
    double slice = 0.1;
    if (timeout_seconds >= 0)
      slice = std::min(slice, std::max(0.0, std::chrono::duration<double>(deadline - Clock::now()).count()));
    bool done;
    {
      py::gil_scoped_release release;
      done = wait(slice);
    }
    if (done) return true;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (timeout_seconds >= 0 && Clock::now() >= deadline) return false;
  }
}

double TimeoutSeconds(const py::object& timeout) { return timeout.is_none() ? -1.0 : timeout.cast<double>(); }

// A job handle that also owns the Python objects whose memory the job reads
// or writes, so they outlive it.
class PyTicket {
 public:
  PyTicket(std::shared_ptr<Ticket> t, py::object keepalive, std::shared_ptr<ReadProgress> progress = nullptr)
      : t_(std::move(t)), progress_(std::move(progress)), keepalive_(std::move(keepalive)) {}
  ~PyTicket() {
    if (!t_->done()) {  // never free memory a worker may still touch
      t_->Cancel();
      py::gil_scoped_release release;
      t_->Wait(-1);
    }
  }
  bool wait(py::object timeout) {
    return WaitInterruptibly([this](double s) { return t_->Wait(s); }, TimeoutSeconds(timeout));
  }
  // Waits without being interruptible: used after cancel() to know when
  // buffers are free.
  void wait_uninterruptible() {
    py::gil_scoped_release release;
    t_->Wait(-1);
  }
  // Read jobs: waits until request i has arrived and been verified; raises
  // the job's error if it failed first.
  void wait_request(size_t i) {
    if (!progress_) throw std::invalid_argument("not a read job");
    WaitInterruptibly([this, i](double s) { return progress_->Wait(i, s); }, -1.0);
    if (t_->failed()) {
      wait_uninterruptible();
      check();
    }
  }
  // Read jobs, REQUIRES done(): for each request, whether its destination
  // received any bytes (after a failure, the others are untouched).
  std::vector<bool> written() const {
    if (!progress_) throw std::invalid_argument("not a read job");
    std::vector<bool> out(progress_->size());
    for (size_t i = 0; i < out.size(); ++i) out[i] = progress_->Written(i);
    return out;
  }
  // Save jobs: true once the job no longer reads the records' memory.
  bool wait_sources_released(py::object timeout) {
    return WaitInterruptibly([this](double s) { return t_->WaitSourcesReleased(s); }, TimeoutSeconds(timeout));
  }
  bool done() const { return t_->done(); }
  void cancel() { t_->Cancel(); }
  // REQUIRES: done(). Raises the job's error, if any.
  void check() const {
    Status s = t_->status();
    if (!s.ok()) RaiseStatus(s);
  }
  py::dict stats() const {
    JobStats st = t_->stats();
    py::dict d;
    d["path"] = st.path;
    d["bytes"] = st.bytes;
    d["seconds"] = st.seconds;
    d["direct_io"] = st.direct_io;
    d["block_bytes"] = st.block_bytes;
    return d;
  }

 private:
  std::shared_ptr<Ticket> t_;
  std::shared_ptr<ReadProgress> progress_;
  py::object keepalive_;
};

// Page-aligned memory exposed through the buffer protocol, so torch.frombuffer
// can wrap it without a copy; the tensor then keeps this object alive.
class PyAlignedBuffer {
 public:
  PyAlignedBuffer(size_t size, size_t capacity, bool prefault)
      : size_(size), buf_(std::max(size, capacity), prefault) {
    if (std::max(size, capacity) > 0 && buf_.data() == nullptr) throw std::bad_alloc();
  }
  uint8_t* data() { return buf_.data(); }
  size_t size() const { return size_; }
  size_t capacity() const { return buf_.capacity(); }

 private:
  size_t size_;
  AlignedBuffer buf_;
};

// A record's bytes: a Python buffer (bytes, memoryview) or an (address, size) pair.
struct Bytes {
  const uint8_t* data;
  uint64_t size;
};
Bytes BytesOf(py::handle data) {
  if (py::isinstance<py::tuple>(data)) {
    auto t = data.cast<py::tuple>();
    return {reinterpret_cast<const uint8_t*>(t[0].cast<uintptr_t>()), t[1].cast<uint64_t>()};
  }
  py::buffer_info info = py::reinterpret_borrow<py::buffer>(data).request();
  return {static_cast<const uint8_t*>(info.ptr), static_cast<uint64_t>(info.size * info.itemsize)};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ckptio's native engine: zip layout, CRC-32, parallel O_DIRECT I/O, durable commit.";

  py::class_<PyTicket>(m, "Ticket")
      .def("wait", &PyTicket::wait, py::arg("timeout") = py::none(),
           "Block until the job is done (True) or `timeout` seconds pass (False).")
      .def("wait_uninterruptible", &PyTicket::wait_uninterruptible)
      .def("wait_request", &PyTicket::wait_request, py::arg("index"),
           "Read jobs: block until request `index` is read and verified.")
      .def("wait_sources_released", &PyTicket::wait_sources_released, py::arg("timeout") = py::none(),
           "Save jobs: block until the records' memory is no longer read (True) or timeout (False).")
      .def("written", &PyTicket::written,
           "Read jobs, once done: per request, whether its destination received any bytes.")
      .def("done", &PyTicket::done)
      .def("cancel", &PyTicket::cancel)
      .def("check", &PyTicket::check, "Raise the job's error, if it failed. Requires done().")
      .def("stats", &PyTicket::stats);

  py::class_<PyAlignedBuffer>(m, "AlignedBuffer", py::buffer_protocol())
      .def(py::init<size_t, size_t, bool>(), py::arg("size"), py::arg("capacity") = 0, py::arg("prefault") = false,
           py::call_guard<py::gil_scoped_release>(),
           "Page-aligned memory; prefault touches every page now (GIL released) so first use is fast.")
      .def_property_readonly("address", [](PyAlignedBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); })
      .def_property_readonly("capacity", &PyAlignedBuffer::capacity)
      .def("__len__", &PyAlignedBuffer::size)
      .def_buffer([](PyAlignedBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {1});
      });

  py::class_<Engine>(m, "Engine")
      .def(py::init([](size_t num_threads, size_t block_bytes, size_t queue_depth, int direct, bool zero_copy_reads,
                       bool read_prefault) {
             EngineOptions o;
             o.num_threads = num_threads;
             o.block_bytes = block_bytes;
             o.queue_depth = queue_depth;
             o.direct = static_cast<DirectIoMode>(direct);
             o.zero_copy_reads = zero_copy_reads;
             o.read_prefault = read_prefault;
             return std::make_unique<Engine>(o);
           }),
           py::arg("num_threads"), py::arg("block_bytes"), py::arg("queue_depth"), py::arg("direct"),
           py::arg("zero_copy_reads") = false, py::arg("read_prefault") = true)
      .def(
          "save",
          [](Engine& e, const std::string& path, py::list records, uint64_t alignment, py::object keepalive,
             size_t block_bytes, size_t queue_depth, uint64_t base_offset, bool into_existing) {
            std::vector<RecordSpec> specs;
            specs.reserve(records.size());
            for (py::handle item : records) {
              auto t = item.cast<py::tuple>();
              Bytes b = BytesOf(t[1]);
              specs.push_back(RecordSpec{t[0].cast<std::string>(), b.data, b.size});
            }
            std::shared_ptr<Ticket> ticket;
            {
              py::gil_scoped_release release;
              ticket = e.Save(path, std::move(specs), alignment, block_bytes, queue_depth, base_offset, into_existing);
            }
            return std::make_unique<PyTicket>(std::move(ticket), std::move(keepalive));
          },
          py::arg("path"), py::arg("records"), py::arg("alignment"), py::arg("keepalive"),
          py::arg("block_bytes") = 0, py::arg("queue_depth") = 0, py::arg("base_offset") = 0,
          py::arg("into_existing") = false,
          "Start writing records [(name, bytes | (address, size))] to path; returns a Ticket.\n"
          "block_bytes/queue_depth override the engine's for this job when non-zero. With into_existing,\n"
          "the archive goes at base_offset of the existing file, which is not synced or renamed.")
      .def(
          "copy",
          [](Engine& e, py::sequence spans) {
            std::vector<CopySpan> v;
            v.reserve(py::len(spans));
            for (py::handle item : spans) {
              auto t = item.cast<py::tuple>();
              v.push_back(CopySpan{reinterpret_cast<const uint8_t*>(t[0].cast<uintptr_t>()),
                                   reinterpret_cast<uint8_t*>(t[1].cast<uintptr_t>()), t[2].cast<uint64_t>()});
            }
            Status s;
            {
              py::gil_scoped_release release;
              s = e.Copy(v);
            }
            if (!s.ok()) RaiseStatus(s);
          },
          py::arg("spans"),
          "Copy [(src_address, dst_address, size)] in parallel (GIL released); returns when done.\n"
          "REQUIRES: the memory stays valid and unchanged by others until it returns.")
      .def(
          "read",
          [](Engine& e, const std::string& path, py::list requests, py::object keepalive) {
            std::vector<ReadRequest> reqs;
            reqs.reserve(requests.size());
            for (py::handle item : requests) {
              auto t = item.cast<py::tuple>();
              ReadRequest r;
              r.name = t[0].cast<std::string>();
              r.header_offset = t[1].cast<uint64_t>();
              r.end_offset = t[2].cast<uint64_t>();
              r.size = t[3].cast<uint64_t>();
              r.crc = t[4].cast<uint32_t>();
              r.verify = t[5].cast<bool>();
              r.dest = reinterpret_cast<uint8_t*>(t[6].cast<uintptr_t>());
              r.dest_capacity = t[7].cast<uint64_t>();
              reqs.push_back(std::move(r));
            }
            ReadHandle handle;
            {
              py::gil_scoped_release release;
              handle = e.Read(path, std::move(reqs));
            }
            return std::make_unique<PyTicket>(std::move(handle.ticket), std::move(keepalive),
                                              std::move(handle.progress));
          },
          py::arg("path"), py::arg("requests"), py::arg("keepalive"),
          "Start reading [(name, header_offset, end_offset, size, crc, verify, dest_address, dest_capacity)];\n"
          "returns a Ticket whose wait_request(i) says when request i is ready.")
      .def(
          "read_directories",
          [](Engine& e, const std::string& path, const std::vector<std::pair<uint64_t, uint64_t>>& windows) {
            std::vector<std::vector<ZipEntry>> entries;
            Status s;
            {
              py::gil_scoped_release release;
              s = e.ReadDirectories(path, windows, &entries);
            }
            if (!s.ok()) RaiseStatus(s);
            py::list out;
            for (const auto& one : entries) {
              py::list archive;
              for (const ZipEntry& z : one)
                archive.append(py::make_tuple(py::bytes(z.name), z.header_offset, z.end_offset, z.size, z.crc));
              out.append(archive);
            }
            return out;
          },
          py::arg("path"), py::arg("windows"),
          "The directories of the archives at [(base, size)] of one file, in parallel: a list of entry lists.")
      .def(
          "read_directory",
          [](Engine& e, const std::string& path, uint64_t base, uint64_t size) {
            std::vector<ZipEntry> entries;
            uint64_t file_size = 0;
            Status s;
            {
              py::gil_scoped_release release;
              s = e.ReadDirectory(path, &entries, &file_size, base, size);
            }
            if (!s.ok()) RaiseStatus(s);
            py::list out;
            for (const ZipEntry& z : entries)
              out.append(py::make_tuple(py::bytes(z.name), z.header_offset, z.end_offset, z.size, z.crc));
            return py::make_tuple(file_size, out);
          },
          py::arg("path"), py::arg("base") = 0, py::arg("size") = UINT64_MAX,
          "(file_size, [(name: bytes, header_offset, end_offset, size, crc)]) of the archive at\n"
          "bytes [base, base + size) of path (the whole file by default); offsets are absolute.");

  m.def(
      "crc32",
      [](py::buffer data, uint32_t crc) {
        py::buffer_info info = data.request();
        const size_t n = static_cast<size_t>(info.size * info.itemsize);
        py::gil_scoped_release release;
        return Crc32(crc, info.ptr, n);
      },
      py::arg("data"), py::arg("crc") = 0);
  m.def(
      "crc32_portable",
      [](py::buffer data, uint32_t crc) {
        py::buffer_info info = data.request();
        const size_t n = static_cast<size_t>(info.size * info.itemsize);
        py::gil_scoped_release release;
        return Crc32Portable(crc, info.ptr, n);
      },
      py::arg("data"), py::arg("crc") = 0);
  m.def("crc32_combine", &Crc32Combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("len_b"));
  m.def("crc32_backend", &Crc32Backend);
  m.def(
      "check_pickle",
      [](py::buffer data) {
        py::buffer_info info = data.request();
        PickleCheck c = CheckFastPickle(static_cast<const uint8_t*>(info.ptr),
                                        static_cast<size_t>(info.size * info.itemsize));
        return py::make_tuple(c.fast ? "fast" : c.unsafe ? "unsafe" : "slow", Text(c.reason));
      },
      py::arg("data"),
      "(verdict, reason) of a pickle (csrc/engine/pickle_check.h): 'fast' (ckptio's fast unpickling path may\n"
      "run it), 'unsafe' (it writes into a global: refuse it) or 'slow' (torch's unpickler must judge it).");
  DefinePickleFastPath(m);
  DefineNativePickler(m);
  m.def(
      "_arm_fault",
      [](const std::string& kind, int error_number, uint64_t at_byte, uint64_t max_chunk, uint64_t count) {
        FaultPlan p;
        if (kind == "write_error_at_byte") p.kind = FaultPlan::Kind::kWriteErrorAtByte;
        else if (kind == "fsync_error") p.kind = FaultPlan::Kind::kFsyncError;
        else if (kind == "short_writes") p.kind = FaultPlan::Kind::kShortWrites;
        else if (kind == "eintr_storm") p.kind = FaultPlan::Kind::kEintrStorm;
        else if (kind == "copy_error") p.kind = FaultPlan::Kind::kCopyError;
        else throw std::invalid_argument("unknown fault kind: " + kind);
        p.error_number = error_number;
        p.at_byte = at_byte;
        p.max_chunk = max_chunk;
        p.count = count;
        FaultInjector::Get().Arm(p);
      },
      py::arg("kind"), py::arg("error_number") = 0, py::arg("at_byte") = 0, py::arg("max_chunk") = 0,
      py::arg("count") = 0, "Tests only: make the engine's file layer fail as described (see fault_injection.h).");
  m.def("_disarm_faults", [] { FaultInjector::Get().Disarm(); }, "Tests only: stop injecting faults.");
  m.def(
      "_skip_syncs", [](bool file_data, bool directory) { FaultInjector::Get().SkipSyncs(file_data, directory); },
      py::arg("file_data"), py::arg("directory"),
      "Tests only: leave out the commit's file data fsync / directory fsync (see fault_injection.h).");
  // The power-loss simulator's recorder (crash_recorder.h).
  m.def(
      "_crash_record_start", [](const std::string& root) { CrashRecorder::Get().Start(root); }, py::arg("root"),
      "Tests only: log every file-system effect of a save under `root`, with a snapshot of the tree.");
  m.def(
      "_crash_record",
      [](const std::string& kind, const std::string& path, const std::string& path2, int fd) {
        py::gil_scoped_release release;  // the snapshot reads files; engine threads may be recording too
        CrashRecorder::Get().Record(kind.c_str(), path, path2, fd);
      },
      py::arg("kind"), py::arg("path"), py::arg("path2") = "", py::arg("fd") = -1,
      "Tests only: log an effect Python code has just had (see crash_recorder.h).");
  m.def(
      "_crash_record_stop",
      [] {
        std::vector<CrashEvent> events = CrashRecorder::Get().Stop();
        py::list out;
        for (const CrashEvent& e : events) {
          py::list tree;
          for (const TreeEntry& t : e.tree)
            tree.append(py::make_tuple(t.relative_path, t.inode, t.directory, py::bytes(t.contents)));
          out.append(py::make_tuple(e.kind, e.path, e.path2, e.inode, tree));
        }
        return out;
      },
      "Tests only: stop recording; the log as [(kind, path, path2, inode, [(relative path, inode, is_dir, "
      "bytes)])].");
  // The archive's layout for writers that stream it in order (remote files):
  // per record (header bytes, data offset, descriptor size), and the bytes
  // that follow once the CRCs are known.
  py::class_<ZipLayout>(m, "ArchiveLayout")
      .def(py::init([](const std::vector<std::pair<std::string, uint64_t>>& records, uint64_t alignment) {
             std::vector<RecordSpec> specs;
             for (const auto& r : records) specs.push_back(RecordSpec{r.first, nullptr, r.second});
             auto layout = std::make_unique<ZipLayout>();
             Status s = ZipLayout::Plan(specs, alignment, layout.get());
             if (!s.ok()) RaiseStatus(s);
             return layout;
           }),
           py::arg("records"), py::arg("alignment"))
      .def_property_readonly("file_size", &ZipLayout::file_size)
      .def("header", [](const ZipLayout& l, size_t i) { return py::bytes(l.records().at(i).header_bytes); })
      .def("data_offset", [](const ZipLayout& l, size_t i) { return l.records().at(i).data_offset; })
      .def("descriptor", [](const ZipLayout& l, size_t i, uint32_t crc) { return py::bytes(l.Descriptor(i, crc)); })
      .def("tail", [](const ZipLayout& l, const std::vector<uint32_t>& crcs) {
        if (crcs.size() != l.records().size()) throw std::invalid_argument("one CRC per record");
        return py::bytes(l.Tail(crcs));
      });
  m.def(
      "archive_size",
      [](const std::vector<std::pair<std::string, uint64_t>>& records, uint64_t alignment) {
        std::vector<RecordSpec> specs;
        for (const auto& r : records) specs.push_back(RecordSpec{r.first, nullptr, r.second});
        ZipLayout layout;
        Status s = ZipLayout::Plan(specs, alignment, &layout);
        if (!s.ok()) RaiseStatus(s);
        return layout.file_size();
      },
      py::arg("records"), py::arg("alignment"), "Bytes of the archive of [(name, size)] records.");
}
