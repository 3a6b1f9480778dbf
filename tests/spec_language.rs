//! The spec language: what it accepts, how it expands, and the errors it gives.

use zoo::spec::{self, Activation, KernelQuantizer, LabPairing, Node, Op, Padding, Spec};

const HEADER: &str = "name: tiny\ninput: 32x32x1\nclasses: 10\n";

fn parse(body: &str) -> Result<Spec, spec::SpecError> {
    spec::parse_str(&format!("{HEADER}{body}"), "tiny.yaml")
}

fn error(body: &str) -> String {
    parse(body)
        .expect_err("the spec should be rejected")
        .to_string()
}

fn find<'a>(spec: &'a Spec, name: &str) -> &'a Node {
    spec.walk()
        .into_iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

fn conv_input(spec: &Spec, name: &str) -> Activation {
    match &find(spec, name).op {
        Op::Conv(c) => c.input,
        other => panic!("{name} is {other:?}"),
    }
}

#[test]
fn every_shipped_spec_parses_and_fits_its_default_input() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../specs");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let spec = spec::load_file(&path).unwrap_or_else(|e| panic!("{e}"));
            let stem = path
                .file_stem()
                .unwrap()
                .to_str()
                .unwrap()
                .replace('_', "-");
            assert_eq!(spec.name, stem, "registry names are file names with dashes");
            names.push(spec.name);
        }
    }
    names.sort();
    let mut registered: Vec<String> = zoo::list().iter().map(|e| e.name.to_string()).collect();
    registered.sort();
    assert_eq!(names, registered, "every spec in specs/ is compiled in");
    assert_eq!(names.len(), 11);
}

#[test]
fn the_float_teachers_fit_fashion_mnist_and_have_no_binary_layer() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../specs/teachers");
    for (file, input) in [
        ("quicknet_float.yaml", "32x32x1"),
        ("reactnet_float.yaml", "32x32x1"),
        ("resnet_float.yaml", "32x32x1"),
        ("xnornet_float.yaml", "224x224x1"),
    ] {
        let spec = spec::load_file(format!("{dir}/{file}")).unwrap_or_else(|e| panic!("{e}"));
        let config = zoo::ModelConfig {
            input: input.parse().unwrap(),
            classes: 10,
        };
        let totals = spec::analyze(&spec, &config)
            .unwrap_or_else(|e| panic!("{file} at {input}: {e}"))
            .totals();
        assert_eq!(totals.binary_macs, 0, "{file}");
        assert_eq!(totals.binary_params, 0, "{file}");
        assert!(totals.float_macs > 0, "{file}");
    }
}

#[test]
fn a_stage_default_is_overridden_per_block() {
    let spec = parse(
        "binary: {activation: {sign: {clip: 1.25}}, kernel: magnitude_aware_sign, pad_value: 1}
stem: [{conv: {filters: 8, kernel: 3}}]
stages:
  - {block: quicknet, filters: 8, blocks: 3, activation: [lab, sign, {lab: {pairing: official}}]}
  - {block: quicknet, filters: 16, blocks: 2}
head: [global_avg_pool, dense]
",
    )
    .unwrap();
    assert_eq!(
        conv_input(&spec, "stage1.block1.conv"),
        Activation::Lab(LabPairing::Channel)
    );
    assert_eq!(
        conv_input(&spec, "stage1.block2.conv"),
        Activation::Sign { clip: 1.0 }
    );
    assert_eq!(
        conv_input(&spec, "stage1.block3.conv"),
        Activation::Lab(LabPairing::Official)
    );
    // The second stage takes the spec-wide default, and a transition because the width changes.
    assert_eq!(
        conv_input(&spec, "stage2.block2.conv"),
        Activation::Sign { clip: 1.25 }
    );
    assert!(matches!(
        find(&spec, "stage2.transition.blur").op,
        Op::BlurPool(_)
    ));
    match &find(&spec, "stage2.block1.conv").op {
        Op::Conv(c) => {
            assert_eq!(
                c.kernel_quantizer,
                KernelQuantizer::MagnitudeAwareSign { clip: 1.0 }
            );
            assert_eq!(
                (c.pad_value, c.padding, c.kernel),
                (1.0, Padding::Same, [3, 3])
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_templates_expand_as_the_reference_describes() {
    let bireal = zoo::spec("birealnet").unwrap();
    match &find(&bireal, "stage2.block1").op {
        Op::Residual(r) => {
            let kinds: Vec<&str> = r.shortcut.iter().map(|n| n.op.kind()).collect();
            assert_eq!(kinds, ["avg_pool", "conv", "batch_norm"]);
            match &r.body[0].op {
                Op::Conv(c) => assert_eq!(
                    (c.stride, c.input, c.pad_value),
                    ([2, 2], Activation::ApproxSign, 0.0)
                ),
                other => panic!("{other:?}"),
            }
        }
        other => panic!("{other:?}"),
    }
    let reactnet = zoo::spec("reactnet-lab").unwrap();
    // Width doubling: one binarizer (one LAB) feeding two 1x1 convolutions, added to the input
    // concatenated with itself.
    match &find(&reactnet, "stage2.block1.res2").op {
        Op::Residual(r) => {
            assert!(matches!(r.shortcut[0].op, Op::Duplicate));
            assert!(matches!(r.body[1].op, Op::Binarize(Activation::Lab(_))));
            assert!(matches!(&r.body[2].op, Op::Concat(b) if b.len() == 2));
        }
        other => panic!("{other:?}"),
    }
    let labbnn = zoo::spec("labbnn").unwrap();
    assert!(matches!(
        find(&labbnn, "stage4.block4.prelu").op,
        Op::PRelu(_)
    ));
}

#[test]
fn a_new_network_needs_no_rust_change() {
    // Other widths, depths and binarizers, a hand-written residual and a layers stage.
    let spec = parse(
        "stem:
  - {conv: {filters: 12, kernel: 3, stride: 2}}
  - batch_norm
stages:
  - {block: bireal, filters: 12, blocks: 1, activation: swish_sign, post_activation: {prelu: {alpha: 0.1}}}
  - layers:
      - residual:
          body: [bias, {quant_conv: {filters: 12, kernel: 3, activation: lab}}, batch_norm]
      - {max_pool: {size: 2}}
head: [global_avg_pool, {dense: {units: classes}}]
",
    )
    .unwrap();
    let analysis = spec::analyze(&spec, &spec.default_config()).unwrap();
    assert_eq!(analysis.output.channels, 10);
    assert!(analysis
        .params()
        .any(|p| p.name == "stage2.res1.qconv1.lab.beta"));
    assert!(analysis
        .params()
        .any(|p| p.name == "stage1.block1.prelu.weight"));
}

#[test]
fn unknown_keys_name_the_place_and_the_accepted_keys() {
    let e = error("stem: [{conv: {filters: 8, kernel: 3, strides: 2}}]\n");
    assert!(e.starts_with("tiny.yaml:4:39:"), "{e}");
    assert!(
        e.contains("`stem[0].conv.strides`: unknown key `strides`; expected one of:"),
        "{e}"
    );
    assert!(e.contains("`kernel`") && e.contains("`stride`"), "{e}");
    let e = error("stem: [{conv: {filters: 8, kernal: 3}}]\n");
    assert!(
        e.contains("missing `kernel`: expected the kernel size (is `kernal` a misspelling of it?)"),
        "{e}"
    );
    let e = error("stem: [relu]\nlayers: []\n");
    assert!(
        e.contains("tiny.yaml:5:1") && e.contains("unknown key `layers`"),
        "{e}"
    );
}

#[test]
fn wrong_types_and_values_say_what_was_expected() {
    let e = spec::parse_str(
        "name: tiny\ninput: 32x32x1\nclasses: ten\nstem: [relu]\n",
        "t.yaml",
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "t.yaml:3:10: `classes`: expected a positive integer, found the string \"ten\""
    );
    let e = error("stem: [{conv: {filters: 0, kernel: 3}}]\n");
    assert!(
        e.contains("`stem[0].conv.filters`: expected a positive integer, found 0"),
        "{e}"
    );
    let e = error("stem: [{conv: {filters: 8, kernel: 3}}]\nstages: [{block: quicknet, filters: 8, blocks: 2, activation: [lab, sign, sign]}]\n");
    assert!(
        e.contains("tiny.yaml:5:") && e.contains("one per block), found a list of 3"),
        "{e}"
    );
    let e = error("stem: [{quant_conv: {filters: 8, kernel: 3, activation: sigmoid}}]\n");
    assert!(
        e.contains("unknown activation binarizer `sigmoid`; expected one of `none`, `sign`"),
        "{e}"
    );
    let e = error("stem: [{quant_conv: {filters: 8, kernel: 3, pad_value: 0.5}}]\n");
    assert!(
        e.contains("`stem[0].quant_conv.pad_value`: expected 0 or 1"),
        "{e}"
    );
    let e = error("stem: [{batch_norm: {momentum: 1.5}}]\n");
    assert!(
        e.contains("tiny.yaml:4:32: `stem[0].batch_norm.momentum`: expected a momentum in [0, 1)"),
        "{e}"
    );
    let e = error("stem: [softmax]\n");
    assert!(
        e.contains("tiny.yaml:4:8") && e.contains("unknown layer `softmax`"),
        "{e}"
    );
    let e = error("stem: [{conv: {filters: 8}}]\n");
    assert!(e.contains("`stem[0].conv.kernel`: missing `kernel`"), "{e}");
    let e = spec::parse_str("name: Tiny\n", "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`name`: expected a name of lowercase letters"),
        "{e}"
    );
    let e = spec::parse_str("name: tiny\ninput: 32x32\nclasses: 1\n", "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t.yaml:2:8: `input`: expected an input shape HxWxC"),
        "{e}"
    );
    let e = spec::parse_str("name: tiny\nstem: [relu\n", "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("t.yaml:3:") && e.contains("invalid YAML"),
        "{e}"
    );
}

#[test]
fn impossible_shapes_are_reported_at_the_layer() {
    let e = error("stem: [{conv: {filters: 8, kernel: 3}}]\nhead: [{dense: {units: 4}}]\n");
    assert!(
        e.contains("tiny.yaml:5:8: `head.dense1`: a dense layer needs a flat input"),
        "{e}"
    );
    assert!(e.contains("(input to this layer: 32x32x8)"), "{e}");
    let e = error("stem: [{conv: {filters: 8, kernel: 40, padding: valid}}]\n");
    assert!(
        e.contains("`stem.conv1`: a 40x40 window with VALID padding does not fit in 32x32"),
        "{e}"
    );
    let e = error("stem: [{conv: {filters: 8, kernel: 3}}]\nstages: [{block: reactnet, filters: 24, blocks: 1}]\n");
    assert!(e.contains("filters` must be 8 or 16, found 24"), "{e}");
    let e = error("stages: [{block: quicknet, filters: 8, blocks: 1}]\n");
    assert!(e.contains("needs a fixed number of input channels"), "{e}");
    let e =
        error("stem: [{conv: {filters: 8, kernel: 3}}, global_avg_pool, {dense: {units: 4}}]\n");
    assert!(
        e.contains(
            "`stem.dense1`: the network ends with 1x1x4 but must give one logit per class (1x1x10)"
        ),
        "{e}"
    );
    let e = error("stem: [{relu: {name: a}}, {relu: {name: a}}]\n");
    assert!(
        e.contains("`stem.a`: layer name `stem.a` clashes with `stem.a` at line 4"),
        "{e}"
    );
}

/// Absurd sizes fail in validation, at the field or layer, before anything is allocated.
#[test]
fn absurd_sizes_are_refused_before_any_allocation() {
    let e = error("stem: [{conv: {filters: 100000000000, kernel: 3}}]\n");
    assert!(
        e.contains("`stem[0].conv.filters`") && e.contains("at most 16777216, found 100000000000"),
        "{e}"
    );
    // 16M filters of 3x3x1: a kernel of 151M values fits the limit, the 16M x 32 x 32 output
    // does not.
    let e = error("stem: [{conv: {filters: 16777216, kernel: 3}}]\n");
    assert!(
        e.contains("`stem.conv1`: its output would hold 17179869184 values, more than the limit"),
        "{e}"
    );
    let e =
        error("stem: [{conv: {filters: 4096, kernel: 3}}, {conv: {filters: 4096, kernel: 9}}]\n");
    assert!(
        e.contains("`stem.conv2`: the kernel would hold 1358954496 values"),
        "{e}"
    );
    let e = error(
        "stem: [{conv: {filters: 8, kernel: 3}}]\nstages: [{block: quicknet, filters: 8, blocks: 5000}]\n",
    );
    assert!(
        e.contains("at most 1024 blocks in a stage, found 5000"),
        "{e}"
    );
    // Eight 4096x4096x3x3 kernels of 151M values each: the eighth passes 2^30 parameters.
    let big = "{conv: {filters: 4096, kernel: 3}}, ".repeat(8);
    let e = error(&format!(
        "stem: [{{conv: {{filters: 8, kernel: 3}}}}, {{conv: {{filters: 4096, kernel: 1}}}}, {big}]\n"
    ));
    assert!(
        e.contains("`stem.conv10`: the model reaches") && e.contains("parameters here"),
        "{e}"
    );
    assert!(spec::parse_str(
        "name: x\ninput: 99999999x2x3\nclasses: 10\nstem: [relu]\n",
        "x.yaml"
    )
    .is_err());
}

#[test]
fn input_shapes_parse_from_text() {
    let shape: spec::InputShape = "224x224x3".parse().unwrap();
    assert_eq!((shape.height, shape.width, shape.channels), (224, 224, 3));
    assert!("224x224".parse::<spec::InputShape>().is_err());
    assert!("0x4x4".parse::<spec::InputShape>().is_err());
}

/// Larq Zoo's numbers for QuickNet at 224x224x3 with 1000 classes.
#[test]
fn quicknet_costs_match_larq_zoo() {
    let spec = zoo::spec("quicknet").unwrap();
    let totals = spec::analyze(&spec, &spec.default_config())
        .unwrap()
        .totals();
    assert_eq!(zoo::summary::si(totals.params), "13.2 M");
    assert_eq!(zoo::summary::si(totals.binary_macs), "1.85 G");
    assert_eq!(
        zoo::summary::si(totals.binary_macs + totals.float_macs),
        "1.88 G"
    );
    let size = totals.model_size_bytes() / (1024.0 * 1024.0);
    assert!((size - 4.17).abs() < 0.05, "{size} MiB");
    // Bi-Real Net 18: 1.68 G binary operations, as its paper reports.
    let bireal = zoo::spec("birealnet").unwrap();
    let t = spec::analyze(&bireal, &bireal.default_config())
        .unwrap()
        .totals();
    assert_eq!(zoo::summary::si(t.binary_macs), "1.68 G");
}

#[test]
fn train_recipes_parse_and_bad_ones_point_at_the_field() {
    let body = "stem: [{conv: {filters: 8, kernel: 3}}]\nhead: [global_avg_pool, dense]\n";
    let recipe = parse(&format!(
        "{body}train: {{epochs: 60, batch_size: 128, learning_rate: 1.0e-4, schedule: {{step: {{every_epochs: 20, factor: 0.1}}}}, kernel_l2: 5.0e-7}}\n"
    ))
    .unwrap()
    .train
    .expect("a recipe");
    assert_eq!((recipe.epochs, recipe.batch_size), (60, 128));
    assert_eq!(
        recipe.schedule,
        spec::Schedule::Step {
            every_epochs: 20,
            factor: 0.1
        }
    );
    assert_eq!(recipe.kernel_l2, 5e-7);
    assert_eq!(recipe.optimizer, spec::Optimizer::Adam);
    assert!(parse(body).unwrap().train.is_none());

    let e = error(&format!("{body}train: {{schedule: cosin}}\n"));
    assert!(e.starts_with("tiny.yaml:6:"), "{e}");
    assert!(e.contains("expected a schedule"), "{e}");
    let e = error(&format!("{body}train: {{weight_decay: 0.1}}\n"));
    assert!(e.contains("needs `optimizer: adamw`"), "{e}");
    let e = error(&format!("{body}train: {{label_smoothing: 1.5}}\n"));
    assert!(e.contains("label smoothing in [0, 1)"), "{e}");
    let e = error(&format!("{body}train: {{epoch: 3}}\n"));
    assert!(
        e.contains("epochs"),
        "unknown keys list the accepted ones: {e}"
    );
    // The command-line form of schedules reads back what it writes.
    for s in ["constant", "linear:0.000001", "cosine:0", "step:30:0.1"] {
        let parsed: spec::Schedule = s.parse().unwrap();
        assert_eq!(
            parsed.to_string().parse::<spec::Schedule>().unwrap(),
            parsed
        );
    }
    assert!("step:0".parse::<spec::Schedule>().is_err());
}
