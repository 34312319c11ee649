// Python face of the emulator: lladapter_emu_bind(m) fills the module lladapter_ext._emu (the lead's module file
// calls it inside PYBIND11_MODULE(_emu, m)). llemu::KernelError derives from std::runtime_error, which pybind11
// raises as RuntimeError with the message intact.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "emu.h"
#include "guarded_memory.h"
#include "selftest.h"

namespace py = pybind11;

namespace {

py::dict config_dict(const llemu::Config& c) {
  py::dict d;
  d["schedule"] = llemu::schedule_name(c.schedule);
  d["seed"] = c.seed;
  d["layout"] = llemu::layout_name(c.layout);
  d["layout_seed"] = c.layout_seed;
  d["workers"] = c.workers;
  d["stack_kib"] = c.stack_kib;
  d["timeout_s"] = c.timeout_s;
  return d;
}

py::dict profile_dict(const llemu::DeviceProfile& p) {
  py::dict d;
  d["name"] = p.name;
  d["description"] = p.description;
  d["major"] = p.major;
  d["minor"] = p.minor;
  d["sm_count"] = p.sm_count;
  d["max_threads_per_block"] = p.max_threads_per_block;
  d["max_block_dim"] = py::make_tuple(p.max_block_dim[0], p.max_block_dim[1], p.max_block_dim[2]);
  d["max_grid_dim"] = py::make_tuple(p.max_grid_dim[0], p.max_grid_dim[1], p.max_grid_dim[2]);
  d["warp_size"] = p.warp_size;
  d["static_smem_limit"] = p.static_smem_limit;
  d["smem_optin_limit"] = p.smem_optin_limit;
  d["smem_per_sm"] = p.smem_per_sm;
  d["regs_per_block"] = p.regs_per_block;
  d["total_global_mem"] = p.total_global_mem;
  return d;
}

}  // namespace

void lladapter_emu_bind(py::module_& m) {
  m.doc() = "llemu: CPU emulator for the CUDA kernels (docs/emulator.md)";

  m.def(
      "configure",
      [](py::object schedule, py::object seed, py::object layout, py::object layout_seed, py::object workers,
         py::object stack_kib, py::object timeout_s) {
        llemu::Config c = llemu::config();
        if (!schedule.is_none()) c.schedule = llemu::parse_schedule(schedule.cast<std::string>());
        if (!seed.is_none()) c.seed = seed.cast<uint64_t>();
        if (!layout.is_none()) c.layout = llemu::parse_layout(layout.cast<std::string>());
        if (!layout_seed.is_none()) c.layout_seed = layout_seed.cast<uint64_t>();
        if (!workers.is_none()) c.workers = workers.cast<int>();
        if (!stack_kib.is_none()) c.stack_kib = stack_kib.cast<int>();
        if (!timeout_s.is_none()) c.timeout_s = timeout_s.cast<double>();
        llemu::configure(c);
        return config_dict(llemu::config());
      },
      py::kw_only(), py::arg("schedule") = py::none(), py::arg("seed") = py::none(), py::arg("layout") = py::none(),
      py::arg("layout_seed") = py::none(), py::arg("workers") = py::none(), py::arg("stack_kib") = py::none(),
      py::arg("timeout_s") = py::none(),
      "Set knobs (None keeps a value): schedule 'inorder'|'reverse'|'random', seed, layout 'sm80'|'scrambled', "
      "layout_seed, workers (0: min(2, cores)), stack_kib, timeout_s (0: none). Returns the new configuration.");
  m.def("config", [] { return config_dict(llemu::config()); }, "The current configuration as a dict.");

  m.def(
      "set_device_profile",
      [](const std::string& name, py::object sm_count) {
        llemu::set_device_profile(name, sm_count.is_none() ? 0 : sm_count.cast<int>());
        return profile_dict(llemu::device_profile());
      },
      py::arg("name"), py::arg("sm_count") = py::none(),
      "Emulate 'sm80' (A100) or 'sm90' (H100/H200), optionally with another SM count.");
  m.def("device_profile", [] { return profile_dict(llemu::device_profile()); });
  m.def("device_profile_names", &llemu::device_profile_names);

  m.def(
      "launched_kernels",
      [] {
        py::dict d;
        for (const auto& kv : llemu::launched_kernels()) {
          py::dict r;
          r["launches"] = kv.second.launches;
          r["blocks"] = kv.second.blocks;
          r["threads"] = kv.second.threads;
          r["sites"] = kv.second.sites;
          r["instantiations"] = kv.second.functions.size();
          d[py::str(kv.first)] = r;
        }
        return d;
      },
      "Kernel name as written at the launch site -> {launches, blocks, threads, sites, instantiations} "
      "(instantiations: distinct kernel functions launched under that name, e.g. template arguments).");
  m.def("stats", [] {
    const llemu::Stats s = llemu::stats();
    py::dict d;
    d["launches"] = s.launches;
    d["blocks"] = s.blocks;
    d["fibers"] = s.fibers;
    d["context_switches"] = s.context_switches;
    d["barriers"] = s.barriers;
    d["warp_collectives"] = s.warp_collectives;
    d["wmma_ops"] = s.wmma_ops;
    d["errors"] = s.errors;
    return d;
  });
  m.def("reset_stats", &llemu::reset_stats, "Clear the stats, the kernel registry and the warnings.");
  m.def(
      "warnings",
      [] {
        py::dict d;
        for (const auto& kv : llemu::warnings()) d[py::str(kv.first)] = kv.second;
        return d;
      },
      "Warning message -> count.");
  m.def("clear_warnings", &llemu::clear_warnings);

  m.def("guarded_allocator", &llemu::set_guarded_cpu_allocator, py::arg("enabled"),
        "Route torch's CPU allocations through the guard-page allocator (True) or back (False). Returns the "
        "previous state.");
  m.def("guarded_allocator_enabled", &llemu::guarded_cpu_allocator_enabled);
  m.def("guarded_live_allocations", &llemu::guarded_live_allocations);
  m.def("guarded_errors", &llemu::take_guarded_errors,
        "Canary corruptions found when guarded allocations were freed (clears the list).");
  m.def("check_guarded_canaries", &llemu::check_guarded_canaries,
        "Check every live guarded allocation now; '' or a description of each corruption.");

  m.def(
      "wmma_element_position",
      [](int kind, int lane, int i) {
        int r = 0, c = 0;
        llemu::wmma_element_position(kind, lane, i, &r, &c);
        return py::make_tuple(r, c);
      },
      py::arg("kind"), py::arg("lane"), py::arg("i"),
      "(row, col) of fragment element i of lane under the configured layout; kind 0 = A, 1 = B, 2 = accumulator.");

  m.def(
      "selftest",
      [](const std::string& name) {
        llemu::SelftestResult r;
        {
          py::gil_scoped_release nogil;
          r = llemu::run_selftest(name);
        }
        return r;
      },
      py::arg("name"), "Run a self-test kernel; broken ones raise RuntimeError with the emulator's message.");
  m.def("selftest_names", &llemu::selftest_names);
}
